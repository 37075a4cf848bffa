"""Which VAE and text encoder made the latents, and the rule that every later stage uses the same ones.

Latents are only meaningful with the VAE that made them: decoded by another one they are coloured
noise. So the precompute job records who its encoders are in the latent manifest, and from there on
that record is the source of truth:

- training takes `precompute.vae` / `precompute.text_encoder` from `data.latent_shards/manifest.json`
  when its config leaves them unset, and stops (exit 2, before any process group) when its config
  names another one, naming both;
- the trainer writes the resolved encoders into `run.output_dir/config.yaml` and records the
  identities in every checkpoint;
- sampling, evaluation and export take them from the checkpoint's record, and refuse a config that
  names others.

An identity says who an encoder is, not where it lies: a pretrained directory is known by the
sha256 of its files (so a moved copy is the same encoder, a retrained one is not), a random-init
one by its inline `arch` and init seed.
"""

from __future__ import annotations

import hashlib
import json
import os

from i2v.core.errors import ConfigError, DataError

ENCODERS = {"vae": "precompute.vae", "text_encoder": "precompute.text_encoder"}
MANIFEST_FILE = "manifest.json"  # the latent dataset's manifest (i2v.data.latents writes it)
SKIP_SUFFIXES = (".md", ".txt", ".lock")  # documentation beside the weights does not change the model


# --------------------------------------------------------------------------- identities


def _section(cfg, which: str):
    return getattr(cfg.precompute, which)


def named(cfg, which: str) -> bool:
    """True when the config itself names this encoder (a directory or an inline arch)."""
    s = _section(cfg, which)
    return bool(s.pretrained or s.arch)


def model_dirs(which: str, pretrained: str) -> list[str]:
    """The directories whose files make the encoder: the VAE directory; T5's model and tokenizer
    directories (a diffusers root's text_encoder/ and tokenizer/, or one T5 directory)."""
    if which == "text_encoder" and os.path.isdir(os.path.join(pretrained, "text_encoder")):
        return [os.path.join(pretrained, "text_encoder"), os.path.join(pretrained, "tokenizer")]
    return [pretrained]


def files_digest(directories: list[str], known: dict | None = None) -> dict:
    """{"files": {relpath: {bytes, mtime_ns, sha256}}, "sha256": one hash over them all}.

    `known`: an earlier digest of the same directories; a file whose size and mtime are unchanged
    keeps its recorded hash instead of being read again (a T5-XXL is 9.5 GB).
    """
    # Names relative to the model, not to where it lies: a moved copy has the same digest.
    dirs = [os.path.abspath(d).rstrip("/") for d in directories]
    base = dirs[0] if len(dirs) == 1 else os.path.commonpath(dirs)
    files, old = {}, (known or {}).get("files", {})
    for directory in directories:
        for dirpath, dirnames, names in os.walk(directory):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for n in sorted(names):
                if n.startswith(".") or n.endswith(SKIP_SUFFIXES):
                    continue
                path = os.path.join(dirpath, n)
                rel = os.path.relpath(path, base)
                st = os.stat(path)
                rec = old.get(rel)
                if rec and rec.get("bytes") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
                    files[rel] = rec
                    continue
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        h.update(block)
                files[rel] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}
    total = hashlib.sha256(json.dumps({k: v["sha256"] for k, v in files.items()}, sort_keys=True).encode())
    return {"files": files, "sha256": total.hexdigest()}


def identity(cfg, which: str, known: dict | None = None) -> dict:
    """Who the encoder that `cfg` names is: {"source": "pretrained", "path", "files_sha256", "bytes",
    "files"} or {"source": "arch", "arch", "seed"}. `known`: a recorded identity whose file hashes
    may be reused for unchanged files."""
    s = _section(cfg, which)
    if s.pretrained:
        if not os.path.isdir(s.pretrained):
            raise ConfigError(f"{ENCODERS[which]}.pretrained: directory not found: {s.pretrained}")
        digest = files_digest(model_dirs(which, s.pretrained), (known or {}).get("digest"))
        return {"source": "pretrained", "path": os.path.abspath(s.pretrained), "files_sha256": digest["sha256"],
                "bytes": sum(f["bytes"] for f in digest["files"].values()), "digest": digest}
    seed = cfg.run.seed if s.seed is None else s.seed
    return {"source": "arch", "arch": dict(s.arch), "seed": seed}


def same(a: dict, b: dict) -> bool:
    """Whether two identities are the same encoder (paths may differ; contents may not)."""
    if a.get("source") != b.get("source"):
        return False
    if a["source"] == "pretrained":
        return a.get("files_sha256") == b.get("files_sha256")
    return a.get("arch") == b.get("arch") and a.get("seed") == b.get("seed")


def describe(ident: dict) -> str:
    if ident.get("source") == "pretrained":
        return f"{ident.get('path')} (files sha256 {str(ident.get('files_sha256'))[:12]}, {ident.get('bytes')} bytes)"
    arch = json.dumps(ident.get("arch"), sort_keys=True)
    return f"an inline arch, seed {ident.get('seed')} ({arch[:60] + '...' if len(arch) > 60 else arch})"


# --------------------------------------------------------------------------- the manifest


def manifest_encoders(latent_shards: str, remote_cfg=None) -> tuple[dict | None, str]:
    """({"vae": identity, "text_encoder": identity} or None, manifest path) of a latent dataset: a local
    directory, or the folder of a remote shard pattern (`s3://b/latents/latents-{0..7}.tar`).

    None when there is no manifest there (hand-made shards), or when the manifest predates recorded
    identities: then the config alone decides, as before.
    """
    from i2v.data import remote

    if isinstance(latent_shards, str) and remote.is_remote(latent_shards):
        path = f"{remote.parent_url(latent_shards)}/{MANIFEST_FILE}"
        try:
            data = remote.read_object(path, remote_cfg)
            manifest = json.loads(data) if data is not None else None
        except (OSError, ValueError) as e:
            raise DataError(f"data.latent_shards: cannot read {path}: {e}") from None
        if manifest is None:
            return None, path
    else:
        path = os.path.join(latent_shards, MANIFEST_FILE) if isinstance(latent_shards, str) else ""
        if not path or not os.path.isfile(path):
            return None, path
        try:
            with open(path) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"data.latent_shards: cannot read {path}: {e}") from None
    found = {w: manifest.get(w) for w in ENCODERS}
    if not all(isinstance(v, dict) and v.get("source") in ("pretrained", "arch") and
               ("files_sha256" in v or "arch" in v) for v in found.values()):
        return None, path
    return found, path


def adopt(cfg, recorded: dict, where: str, what: str) -> list[str]:
    """Make `cfg`'s encoders the recorded ones: fill them in where the config leaves them unset, check
    them where it names them. Returns what it did, one line per encoder. `where` names the record
    (a manifest or checkpoint path), `what` what it belongs to ("the latents", "the checkpoint").

    A recorded pretrained directory must still be there with the same contents; an encoder the config
    names must be the recorded one. Either failure is a ConfigError naming both.
    """
    lines = []
    for which, key in ENCODERS.items():
        theirs = recorded.get(which)
        if not theirs:
            continue
        s = _section(cfg, which)
        named_here = named(cfg, which)
        if not named_here:  # take the recorded one
            if theirs["source"] == "arch":
                s.pretrained, s.arch, s.seed = None, dict(theirs["arch"]), theirs["seed"]
                lines.append(f"{key}: {describe(theirs)}, from {where}")
                continue
            if not os.path.isdir(theirs["path"]):
                raise ConfigError(
                    f"{key}: {what} were made with {theirs['path']} (recorded in {where}), which no longer "
                    f"exists; set {key}.pretrained to where that directory is now"
                )
            s.pretrained, s.arch = theirs["path"], {}
        mine = identity(cfg, which, known=theirs)
        if not same(mine, theirs):
            raise ConfigError(_mismatch(key, mine, theirs, where, what, named_here))
        if s.pretrained:  # absolute from here on: the run's config.yaml is read from other directories
            s.pretrained = os.path.abspath(s.pretrained)
        lines.append(f"{key}: {describe(mine)}, {'as recorded in' if named_here else 'from'} {where}")
    return lines


def _mismatch(key: str, mine: dict, theirs: dict, where: str, what: str, named_here: bool) -> str:
    if named_here:
        return (f"{key}: this run names {describe(mine)}, but {what} were made with {describe(theirs)} "
                f"(recorded in {where}). Leave {key} unset to use the recorded one ({key}.pretrained=null "
                f"\"{key}.arch={{}}\" on the command line), or make {what} again with this one")
    return (f"{key}: {theirs['path']} has changed since {what} were made with it (files sha256 "
            f"{mine['files_sha256'][:12]}, recorded {str(theirs.get('files_sha256'))[:12]} in {where}); "
            f"set {key}.pretrained to the original, or make {what} again")


def resolve_for_training(cfg) -> list[str]:
    """Take the encoders of the run from its latent manifest (see `adopt`); lines to log."""
    recorded, path = manifest_encoders(cfg.data.latent_shards, cfg.data.remote)
    if recorded is None:
        return []
    return adopt(cfg, recorded, path, "the latents")


def recorded_identities(cfg) -> dict:
    """{"vae": ..., "text_encoder": ...} of a resolved config: what a checkpoint records. Files the latent
    manifest already hashed, unchanged since, are not read again."""
    known, _ = manifest_encoders(cfg.data.latent_shards, cfg.data.remote)
    return {w: identity(cfg, w, known=(known or {}).get(w)) for w in ENCODERS if named(cfg, w)}
