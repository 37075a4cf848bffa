"""The frozen encoders of the precompute job, the sampler, validation and export (Config.validate has
already checked that each is named once): the video VAE and the T5 text encoder.

- VAE: diffusers `AutoencoderKLCogVideoX`, from a diffusers directory (`precompute.vae.pretrained`)
  or an inline constructor (`precompute.vae.arch`, random init seeded from its `seed`, else `run.seed`).
- Text: transformers `T5EncoderModel` and its tokenizer from a directory
  (`precompute.text_encoder.pretrained`), or a tiny inline `T5Config` with a tokenizer built in
  code over a fixed vocabulary, so the CPU default never downloads anything.

Both are checked against the DiT they feed: latent channels = `out_channels`, T5 `d_model` =
`text_embed_dim`, `max_length` = `max_text_seq_length`; a mismatch is a `ConfigError` naming the key.
Prompt embeddings follow diffusers' CogVideoX pipelines: pad to `max_length`, no attention mask.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLCogVideoX
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import AutoTokenizer, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from i2v.data import lineage
from i2v.config import Config
from i2v.config.schema import compression_of
from i2v.core import seeding
from i2v.core.errors import ConfigError
from i2v.model.transformer import DTYPES, check_arch_keys, check_pretrained_dir, transformer_arch

T5_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")

# The tiny tokenizer's vocabulary: T5's special ids first (pad 0, eos 1, unk 2), then words that
# cover the synthetic captions and common caption English. Changing it changes every embedding,
# so it is versioned in the identity below.
TINY_TOKENIZER_VERSION = "wordlevel-v1"
_SPECIALS = ["<pad>", "</s>", "<unk>"]
_WORDS = """
a an the this that these those of in on at to from with without and or but is are was were be being
it its his her their there here over under into onto across through around toward towards away
up down left right forward backward top bottom middle centre center side sides corner edge
moving moves move slowly quickly fast slow still static while then frame video clip scene shot
red green blue yellow orange purple pink white black grey gray brown cyan magenta dark light bright
square circle triangle rectangle ball box disk dot star shape shapes object objects line stripe
background foreground small large big tiny one two three man woman person people dog cat car tree
water sky sun camera view close far walking running flying sitting standing looking turning
, . ! ? - '
""".split()
TINY_VOCAB = _SPECIALS + list(dict.fromkeys(_WORDS))


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with T5's special ids, built in memory (works offline)."""
    vocab = {tok: i for i, tok in enumerate(TINY_VOCAB)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # T5 appends </s> to every sequence and pads with <pad>.
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", padding_side="right"
    )


def weights_sha256(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _config_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# --------------------------------------------------------------------------- the DiT's expectations


def dit_dims(cfg: Config) -> dict:
    """Latent channels, text width and text length the DiT takes, without building it."""
    conf = transformer_arch(cfg.model)
    m = cfg.model
    return {
        "channels": conf["out_channels"] or conf["in_channels"] // 2,
        "text_dim": conf["text_embed_dim"],
        "text_len": conf["max_text_seq_length"],
        "where": "model.arch" if m.arch else "model.arch_file" if m.arch_file else "model.pretrained",
    }


def _declared(section, name: str, model_dir, arch_cls, field: str, default, weight_files=None):
    """(value, key to name in an error) of `field` as encoder `name` declares it: in its pretrained
    directory's config.json (the directory is checked first) or in its inline `arch` (keys checked)."""
    key = f"precompute.{name}"
    if section.pretrained:
        check_pretrained_dir(model_dir, f"{key}.pretrained", *([weight_files] if weight_files else []))
        with open(os.path.join(model_dir, "config.json")) as f:
            return json.load(f).get(field, default), f"{key}.pretrained"
    check_arch_keys(section.arch, arch_cls, f"{key}.arch")
    return section.arch.get(field, default), f"{key}.arch.{field}"


def _must_match(key: str, said: str, dims: dict, dit_field: str, want, ok: bool) -> None:
    """An encoder's output must be what the DiT takes: refuse, naming both, before anything is built."""
    if not ok:
        raise ConfigError(f"{key}: {said} but the DiT ({dims['where']}) has {dit_field} {want}; they must be equal")


# --------------------------------------------------------------------------- VAE


def build_vae(cfg: Config) -> AutoencoderKLCogVideoX:
    """The frozen VAE in eval mode, checked against the DiT's latent channels."""
    v = cfg.precompute.vae
    if not v.pretrained and not v.arch:
        raise ConfigError("precompute.vae: set precompute.vae.pretrained (a diffusers VAE directory) or precompute.vae.arch")
    dims = dit_dims(cfg)
    latent_channels, key = _declared(v, "vae", v.pretrained, AutoencoderKLCogVideoX, "latent_channels", 16)
    _must_match(key, f"the VAE has {latent_channels} latent channels", dims, "out_channels", dims["channels"],
                latent_channels == dims["channels"])
    if v.pretrained:
        try:
            vae = AutoencoderKLCogVideoX.from_pretrained(v.pretrained, torch_dtype=DTYPES[v.dtype])
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"precompute.vae.pretrained: cannot load {v.pretrained}: {e}") from None
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seeding.seed("vae-init", init_seed(cfg, v)))
            vae = AutoencoderKLCogVideoX(**v.arch)
        if DTYPES[v.dtype] != torch.float32:
            vae = vae.to(DTYPES[v.dtype])
    if v.tiling:
        vae.enable_tiling()
    if v.slicing:
        vae.enable_slicing()
    vae.requires_grad_(False)
    return vae.eval()


def vae_identity(cfg: Config, vae: AutoencoderKLCogVideoX) -> dict:
    """What a reader needs to know the latents came from this VAE."""
    v = cfg.precompute.vae
    ident = {
        "class": type(vae).__name__,
        "dtype": v.dtype,
        "latent_channels": vae.config.latent_channels,
        "scaling_factor": vae.config.scaling_factor,
        "invert_scale_latents": bool(vae.config.invert_scale_latents),
        "spatial_compression": spatial_compression(vae),
        "temporal_compression": int(vae.config.temporal_compression_ratio),
    }
    if v.pretrained:
        ident.update(source="pretrained", path=os.path.abspath(v.pretrained),
                     config_sha256=_config_sha256(os.path.join(v.pretrained, "config.json")))
    else:
        ident.update(source="arch", seed=init_seed(cfg, v), weights_sha256=weights_sha256(vae))
    # Who it is (what training, sampling and export compare and rebuild from): i2v.data.lineage.
    ident.update(lineage.identity(cfg, "vae"))
    return ident


def init_seed(cfg: Config, section) -> int:
    """The init seed of a random-init (arch) encoder: its own `seed`, else run.seed."""
    return cfg.run.seed if section.seed is None else section.seed


def spatial_compression(vae) -> int:
    return compression_of(vae.config)[0]


def image_latent_scale(vae) -> float:
    """The factor on image latents, as diffusers' I2V pipeline applies it.

    CogVideoX 1.5 VAEs set `invert_scale_latents` because that model was trained with image
    latents divided by the factor; precompute and sampling both follow the flag.
    """
    sf = float(vae.config.scaling_factor)
    return 1.0 / sf if vae.config.invert_scale_latents else sf


@torch.no_grad()
def vae_posterior(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pixels [B, 3, F, H, W] in [-1, 1] -> posterior (mean, std) [B, C, f, h, w] in fp32."""
    dtype = next(vae.parameters()).dtype
    dist = vae.encode(pixels.to(dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def posterior_latents(mean: torch.Tensor, std: torch.Tensor, mode: str, generators: list | None) -> torch.Tensor:
    """The posterior's mode, or a sample with one generator per batch element (batch-size independent)."""
    if mode == "mode":
        return mean
    eps = torch.stack([torch.randn(mean.shape[1:], generator=g, dtype=torch.float32) for g in generators])
    return mean + std * eps.to(mean.device)


# --------------------------------------------------------------------------- text


@dataclass
class TextEncoder:
    tokenizer: object
    model: T5EncoderModel
    max_length: int
    identity: dict

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """prompts -> [B, max_length, d_model] fp32, exactly as the CogVideoX pipelines encode them."""
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        ).input_ids
        device = next(self.model.parameters()).device
        return self.model(ids.to(device))[0].float()


def _t5_dirs(root: str) -> tuple[str, str]:
    """(model dir, tokenizer dir) for a diffusers root (text_encoder/, tokenizer/) or one T5 directory."""
    if os.path.isdir(os.path.join(root, "text_encoder")):
        return os.path.join(root, "text_encoder"), os.path.join(root, "tokenizer")
    return root, root


def build_text_encoder(cfg: Config) -> TextEncoder:
    t = cfg.precompute.text_encoder
    if not t.pretrained and not t.arch:
        raise ConfigError("precompute.text_encoder: set precompute.text_encoder.pretrained or precompute.text_encoder.arch")
    dims = dit_dims(cfg)
    if t.max_length != dims["text_len"]:
        raise ConfigError(
            f"precompute.text_encoder.max_length: is {t.max_length} but the DiT ({dims['where']}) takes "
            f"max_text_seq_length {dims['text_len']}; they must be equal"
        )
    model_dir, tok_dir = _t5_dirs(t.pretrained) if t.pretrained else (None, None)
    d_model, key = _declared(t, "text_encoder", model_dir, T5Config, "d_model", 512, T5_WEIGHT_FILES)
    _must_match(key, f"the text encoder's d_model is {d_model}", dims, "text_embed_dim", dims["text_dim"],
                d_model == dims["text_dim"])
    if t.pretrained:
        if not os.path.isdir(tok_dir):
            raise ConfigError(f"precompute.text_encoder.pretrained: no tokenizer directory at {tok_dir}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
            model = T5EncoderModel.from_pretrained(model_dir, dtype=DTYPES[t.dtype], local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"precompute.text_encoder.pretrained: cannot load {t.pretrained}: {e}") from None
        identity = {"source": "pretrained", "path": os.path.abspath(t.pretrained),
                    "config_sha256": _config_sha256(os.path.join(model_dir, "config.json"))}
    else:
        tokenizer = tiny_tokenizer()
        conf = T5Config(**{"vocab_size": len(TINY_VOCAB), "pad_token_id": 0, "eos_token_id": 1,
                           "decoder_start_token_id": 0, **t.arch})
        if conf.vocab_size < len(TINY_VOCAB):
            raise ConfigError(
                f"precompute.text_encoder.arch.vocab_size: is {conf.vocab_size}, the built-in tokenizer "
                f"needs at least {len(TINY_VOCAB)}"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seeding.seed("text-encoder-init", init_seed(cfg, t)))
            model = T5EncoderModel(conf)
        model = model.to(DTYPES[t.dtype])
        identity = {"source": "arch", "seed": init_seed(cfg, t), "tokenizer": TINY_TOKENIZER_VERSION,
                    "weights_sha256": weights_sha256(model)}
    model.requires_grad_(False)
    identity.update(**{"class": type(model).__name__, "dtype": t.dtype, "d_model": d_model, "max_length": t.max_length})
    identity.update(lineage.identity(cfg, "text_encoder"))
    return TextEncoder(tokenizer, model.eval(), t.max_length, identity)
