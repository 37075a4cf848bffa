import os
import subprocess
import sys
import time

import pytest
import yaml

from i2v.core.errors import ConfigError
from i2v.config import Config, dump_yaml, from_dict, load_config, resolve, to_dict
from i2v.train.ds_config import build_deepspeed_config
from conftest import REPO

TINY = REPO / "configs" / "tiny.yaml"


def load(*overrides):
    return load_config(TINY, list(overrides))


def at(world_size, *overrides):
    """The tiny config with `overrides`, resolved at `world_size` ranks."""
    return resolve(load(*overrides), world_size)


def test_tiny_loads_with_documented_defaults():
    cfg = load()
    assert isinstance(cfg, Config)
    assert cfg.model.arch["in_channels"] == 2 * cfg.model.arch["out_channels"]
    assert cfg.diffusion.num_train_timesteps == 1000 and cfg.diffusion.prediction == "v"
    for section in ("run", "train", "deepspeed", "data", "checkpoint"):
        import dataclasses

        for f in dataclasses.fields(getattr(cfg, section)):
            assert f.metadata.get("help"), f"{section}.{f.name} has no documentation"


def test_overrides_are_typed_and_applied():
    cfg = load("train.max_steps=7", "deepspeed.zero_stage=3", "train.lr=3e-4", "run.output_dir=/tmp/x")
    assert cfg.train.max_steps == 7 and cfg.deepspeed.zero_stage == 3
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.run.output_dir == "/tmp/x"


def test_unknown_key_names_it_with_did_you_mean():
    with pytest.raises(ConfigError) as e:
        load("train.lrr=1")
    assert "train.lrr" in str(e.value) and "Did you mean 'train.lr'" in str(e.value)


def test_unknown_key_in_yaml_file(tmp_path):
    data = yaml.safe_load(TINY.read_text())
    data["checkpoint"]["evry_steps"] = 3
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"checkpoint\.evry_steps.*Did you mean 'checkpoint\.every_steps'"):
        load_config(p)


def test_wrong_type_names_key_and_expectation():
    with pytest.raises(ConfigError, match=r"train\.max_steps: got 'many' \(str\), expected int"):
        load("train.max_steps=many")
    with pytest.raises(ConfigError, match=r"deepspeed\.precision: got 'bf61'.*did you mean 'bf16'"):
        load("deepspeed.precision=bf61")


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="train.max_steps"):
        load("train.max_steps=true")


def test_missing_required_value(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {arch: {in_channels: 8, out_channels: 4}}\ntrain: {max_steps: 3}\nrun: {output_dir: x}\n")
    with pytest.raises(ConfigError, match=r"data\.latent_shards: required but not set"):
        load_config(p)


def test_out_of_range_value():
    with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage: is 4, expected a value in \[0, 3\]"):
        load("deepspeed.zero_stage=4")


def test_inconsistent_global_batch_names_all_factors():
    with pytest.raises(ConfigError) as e:
        at(2, "train.global_batch_size=16", "train.micro_batch_size=2", "train.grad_accum_steps=2")
    msg = str(e.value)
    assert "train.global_batch_size" in msg and "= 8" in msg
    assert at(2, "train.global_batch_size=8", "train.micro_batch_size=2", "train.grad_accum_steps=2")


def test_accumulation_follows_the_global_batch_at_every_world_size():
    fixed = ("train.global_batch_size=12", "train.micro_batch_size=2")
    assert [at(w, *fixed).grad_accum_steps for w in (1, 2, 3, 6)] == [6, 3, 2, 1]
    with pytest.raises(ConfigError) as e:
        at(4, *fixed)
    assert str(e.value).startswith("train.global_batch_size: 12 is not a multiple of train.micro_batch_size (2) x "
                                   "world size (4)")
    assert at(2).grad_accum_steps == 1  # neither set


def test_biases_and_norm_weights_get_no_weight_decay():
    import torch

    from i2v.model.transformer import build_transformer
    from i2v.train.optim import param_groups

    cfg = load("train.weight_decay=0.01")
    model = build_transformer(cfg.model, seed=0)
    decay, no_decay = param_groups(cfg, model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    norms = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, torch.nn.LayerNorm)}
    assert norms and {names[id(p)] for p in no_decay["params"]} == {
        n for n, _ in model.named_parameters() if n.endswith("bias") or n in norms}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert all(p.ndim >= 2 for p in decay["params"])
    cfg.train.no_decay = False
    assert [len(g["params"]) for g in param_groups(cfg, model)] == [len(list(model.parameters()))]


def test_other_inconsistent_combinations():
    with pytest.raises(ConfigError, match="offload_optimizer"):
        load("deepspeed.zero_stage=0", "deepspeed.offload_optimizer=true")
    with pytest.raises(ConfigError, match="diffusion.t_max"):
        load("diffusion.t_max=1000")


def test_bad_override_syntax_and_missing_file():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load("train.max_steps")
    with pytest.raises(ConfigError, match="file not found"):
        load_config("/nonexistent/config.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load("train.max_steps=5")
    dump_yaml(cfg, tmp_path / "config.yaml")
    again = from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (2, "bf16"), (3, "fp16")])
def test_deepspeed_config_is_generated_from_the_tree(stage, precision):
    cfg = load(f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}", "train.grad_accum_steps=3",
               "train.micro_batch_size=2", "train.grad_clip=0.5")
    ds = build_deepspeed_config(cfg, resolve(cfg, 4))
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == 2 * 3 * 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] == (precision == "bf16") and ds["fp16"]["enabled"] == (precision == "fp16")
    assert "optimizer" not in ds


def test_deepspeed_offload_and_passthrough():
    cfg = load("deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true",
               "deepspeed.extra={zero_optimization: {overlap_comm: true}}")
    ds = build_deepspeed_config(cfg, resolve(cfg, 1))
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                       "overlap_comm": True}
    assert ds["optimizer"]["type"] == "AdamW"
    with pytest.raises(ConfigError, match=r"deepspeed\.extra\.train_batch_size: set by the run config"):
        build_deepspeed_config(load("deepspeed.extra={train_batch_size: 8}"), at(1))
    with pytest.raises(ConfigError, match=r"deepspeed\.extra\.zero_optimization\.stage"):
        build_deepspeed_config(load("deepspeed.extra={zero_optimization: {stage: 1}}"), at(1))
    with pytest.raises(ConfigError, match=r"Did you mean 'deepspeed\.extra\.wall_clock_breakdown'"):
        build_deepspeed_config(load("deepspeed.extra={wall_clock_breakdwn: true}"), at(1))


def test_launcher_reports_config_error_without_traceback():
    r = subprocess.run([sys.executable, "launcher/train.py", "--config", "configs/tiny.yaml", "train.lrr=1"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "train.lrr" in r.stderr and "Traceback" not in r.stderr + r.stdout


def test_launcher_refuses_a_bad_validation_geometry_before_any_process_group(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    start = time.monotonic()
    # 8 frames: the tiny VAE compresses time 4x, so it decodes 4k + 1 frames only.
    r = subprocess.run([sys.executable, "launcher/train.py", "--config", "configs/tiny.yaml", f"run.output_dir={out}",
                        "validation.every_steps=5", "validation.pairs=[{image: first.png, prompt: a clip}]",
                        "validation.num_frames=8"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "error: validation.num_frames: is 8; the VAE compresses time 4x" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not out.exists()  # no output folder, no lock, no config.yaml
    log = (r.stdout + r.stderr).lower()
    assert "deepspeed" not in log and "process group" not in log and "[i2v]" not in log
    assert took < 60, f"{took:.1f} s: the check should come before the heavy imports"


# --------------------------------------------------------------------------- one-of groups (pretrained / arch)


def tiny_file(tmp_path, vae: dict, text_encoder_pretrained=None):
    """configs/tiny.yaml with this `precompute.vae` section (and a text encoder directory beside its arch)."""
    data = yaml.safe_load(TINY.read_text())
    data["precompute"]["vae"] = vae
    if text_encoder_pretrained:
        data["precompute"]["text_encoder"]["pretrained"] = text_encoder_pretrained
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_command_line_member_replaces_the_files_other_member(tmp_path):
    from i2v.model import encoders

    # The file's inline VAE is dropped: the command line names a VAE directory.
    cfg = load_config(tiny_file(tmp_path, {"arch": {"latent_channels": 4}}), ["precompute.vae.pretrained=configs/tiny-vae"])
    assert cfg.precompute.vae.pretrained == "configs/tiny-vae" and cfg.precompute.vae.arch == {}
    assert encoders.build_vae(cfg).config.latent_channels == 4
    # And the other way round: an inline VAE replaces the file's directory.
    cfg = load_config(tiny_file(tmp_path, {"pretrained": "configs/tiny-vae"}), ["precompute.vae.arch.latent_channels=4"])
    assert cfg.precompute.vae.pretrained is None and cfg.precompute.vae.arch == {"latent_channels": 4}
    cfg = load("precompute.text_encoder.pretrained=models/t5")
    assert cfg.precompute.text_encoder.arch == {}
    cfg = load(f"model.pretrained={tmp_path}")
    assert cfg.model.pretrained == str(tmp_path) and cfg.model.arch == {}
    cfg = load("model.arch_file=configs/arch/cogvideox-2b-i2v.json")
    assert cfg.model.arch == {} and cfg.model.pretrained is None
    # An inline architecture replaces the file's weights and their arch_file ...
    real = REPO / "configs" / "cogvideox-2b-i2v.yaml"
    cfg = load_config(real, ["model.arch={num_layers: 2}"])
    assert (cfg.model.arch, cfg.model.pretrained, cfg.model.arch_file) == ({"num_layers": 2}, None, None)
    # ... while pretrained and arch_file do not exclude each other: other weights, the same architecture.
    cfg = load_config(real, ["model.pretrained=elsewhere/transformer"])
    assert cfg.model.arch_file == "configs/arch/cogvideox-2b-i2v.json"


def test_an_explicit_empty_member_stays_accepted(tmp_path):
    path = tiny_file(tmp_path, {"arch": {"latent_channels": 4}})
    cfg = load_config(path, ["precompute.vae.pretrained=configs/tiny-vae", "precompute.vae.arch={}"])
    assert cfg.precompute.vae.arch == {} and cfg.precompute.vae.pretrained == "configs/tiny-vae"
    assert load("model.pretrained=x", "model.arch={}").model.pretrained == "x"


def test_two_members_on_the_command_line_are_an_error_naming_the_fix():
    with pytest.raises(ConfigError, match=r"^precompute\.vae\.pretrained: set only one of precompute\.vae\.pretrained "
                                          r"and precompute\.vae\.arch: both are set on the command line; drop one "
                                          r"of the two overrides$"):
        load("precompute.vae.pretrained=configs/tiny-vae", "precompute.vae.arch={latent_channels: 4}")
    with pytest.raises(ConfigError, match=r"^model\.arch: set only one of model\.arch and model\.arch_file: both are "
                                          r"set on the command line"):
        load("model.arch_file=configs/arch/cogvideox-2b-i2v.json", "model.arch={num_layers: 1}")


def test_two_members_in_the_file_name_both_lines_and_the_override_that_fixes_it(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train: {max_steps: 3}\nprecompute:\n  vae:\n    pretrained: configs/tiny-vae\n"
                    "    dtype: fp32\n    arch: {latent_channels: 4}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (
        f"precompute.vae.pretrained: set only one of precompute.vae.pretrained and precompute.vae.arch: both are set "
        f"in {path} (lines 4 and 6); delete one of the two lines, or choose on the command line: to keep "
        "pretrained, add precompute.vae.arch={}; to keep arch, add precompute.vae.pretrained=null")
    # The two fixes it names work on a complete config.
    path = tiny_file(tmp_path, {"pretrained": "configs/tiny-vae", "arch": {"latent_channels": 4}})
    with pytest.raises(ConfigError, match="both are set in"):
        load_config(path)
    assert load_config(path, ["precompute.vae.arch={}"]).precompute.vae.pretrained == "configs/tiny-vae"
    assert load_config(path, ["precompute.vae.pretrained=null"]).precompute.vae.arch == {"latent_channels": 4}


def test_validate_checks_every_group_of_a_config_built_in_code():
    data = to_dict(load())
    data["precompute"]["text_encoder"]["pretrained"] = "models/t5"
    with pytest.raises(ConfigError, match=r"^precompute\.text_encoder\.pretrained: set only one of "
                                          r"precompute\.text_encoder\.pretrained and precompute\.text_encoder\.arch; "
                                          r"to keep pretrained, set precompute\.text_encoder\.arch=\{\}; to keep arch, "
                                          r"set precompute\.text_encoder\.pretrained=null$"):
        from_dict(data)


def test_written_config_keeps_the_accumulation_unset_and_old_configs_still_resume(tmp_path):
    cfg = load("train.global_batch_size=12", "train.micro_batch_size=2")
    before = to_dict(cfg)
    assert cfg.validate() is cfg and to_dict(cfg) == before  # validating changes nothing
    assert at(3, "train.global_batch_size=12", "train.micro_batch_size=2").grad_accum_steps == 2
    dump_yaml(cfg, tmp_path / "config.yaml")
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["train"]["grad_accum_steps"] is None  # derived again at the world size of a resume
    assert [resolve(from_dict(written), w).grad_accum_steps for w in (2, 3)] == [3, 2]
    # An earlier version wrote the accumulation it derived; that file resumes at its world size.
    written["train"]["grad_accum_steps"] = 3
    assert resolve(from_dict(written), 2).grad_accum_steps == 3


def test_checks_on_the_tree_alone_fail_at_load():
    # Each used to wait for the model or the DeepSpeed engine to be built.
    with pytest.raises(ConfigError, match=r"model\.arch: in_channels \(4\) must be 2 x out_channels \(4\)"):
        load("model.arch.in_channels=4")
    with pytest.raises(ConfigError, match=r"deepspeed\.extra\.gradient_clipping: set by the run config; use train\.grad_clip"):
        load("deepspeed.extra={gradient_clipping: 2.0}")
    with pytest.raises(ConfigError, match=r"data\.video\.height/width: 36x64 must be multiples of 8"):
        load("validation.every_steps=5", "data.video.height=36")
    with pytest.raises(ConfigError, match=r"validation\.num_frames: is 10 \(data\.video\.frames"):
        load("validation.every_steps=5", "data.video.frames=10")
    assert load("data.video.frames=10").data.video.frames == 10  # validation off: any length trains


def test_the_old_attention_name_sdpa_is_refused_with_the_new_one(tmp_path):
    with pytest.raises(ConfigError, match=r"^kernels\.attention: 'sdpa' is now called 'torch'; write kernels\.attention: torch$"):
        load("kernels.attention=sdpa")
    path = tmp_path / "old.yaml"
    path.write_text(TINY.read_text().replace("  attention: auto\n", "  attention: sdpa\n", 1))
    assert "attention: sdpa" in path.read_text()
    with pytest.raises(ConfigError, match=rf"kernels\.attention: 'sdpa' at {path}:\d+ is now called 'torch'"):
        load_config(path)
    assert load("kernels.attention=torch").kernels.attention == "torch"
