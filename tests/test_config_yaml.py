"""Mistakes inside a YAML config file are reported like those on the command line, with the file and
line: a misspelled key gets the same did-you-mean, a duplicated key is an error naming both lines."""

import pytest

from i2v.config import load_config
from i2v.core.errors import ConfigError
from conftest import REPO

TINY_TEXT = (REPO / "configs" / "tiny.yaml").read_text()


def tiny_with(tmp_path, old: str, new: str):
    """configs/tiny.yaml with `old` replaced once by `new`; returns (path, line where `new`'s text starts)."""
    assert TINY_TEXT.count(old) == 1, old
    text = TINY_TEXT.replace(old, new)
    path = tmp_path / "x.yaml"
    path.write_text(text)
    start = text.index(new) + len(new) - len(new.lstrip("\n"))
    return path, text[:start].count("\n") + 1


@pytest.mark.parametrize("old,new,override", [
    ("  max_steps: 40\n", "  max_step: 40\n", "train.max_step=5"),
    ("  vae:\n", "  vae:\n    pretrianed: x\n", "precompute.vae.pretrianed=x"),
    ("\ntrain:\n", "\ntrian:\n", "trian.max_steps=5"),
])
def test_a_typo_in_the_file_gets_the_command_lines_message_and_its_line(tmp_path, old, new, override):
    path, line = tiny_with(tmp_path, old, new)
    if "pretrianed" in new:
        line += 1  # the typo is the second line of `new`
    with pytest.raises(ConfigError) as in_file:
        load_config(path)
    with pytest.raises(ConfigError) as on_cli:
        load_config(REPO / "configs" / "tiny.yaml", [override])
    assert "Did you mean" in str(on_cli.value)
    assert str(in_file.value) == str(on_cli.value).replace("unknown key.", f"unknown key at {path}:{line}.", 1)


def test_a_dotted_key_in_the_file_is_told_to_nest(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(TINY_TEXT + "train.lr: 0.1\n")
    line = TINY_TEXT.count("\n") + 1
    with pytest.raises(ConfigError, match=rf"^train\.lr: unknown key at {path}:{line}\. YAML keys do not take "
                                          r"dots: write 'train:' with 'lr:' indented below it"):
        load_config(path)


def test_a_wrong_type_in_the_file_names_its_line(tmp_path):
    path, line = tiny_with(tmp_path, "  max_steps: 40\n", "  max_steps: many\n")
    with pytest.raises(ConfigError, match=rf"^train\.max_steps: got 'many' \(str\) at {path}:{line}, expected int$"):
        load_config(path)
    # An override replaces the file's value, so the file's line is not blamed for it.
    with pytest.raises(ConfigError, match=r"^train\.max_steps: got 'few' \(str\), expected int$"):
        load_config(path, ["train.max_steps=few"])


def test_a_duplicated_key_names_both_lines_with_its_dotted_path(tmp_path):
    path, line = tiny_with(tmp_path, "  lr: 5.0e-3\n", "  lr: 5.0e-3\n  warmup_steps: 1\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=rf"^{path}: train\.lr is set twice at lines {line} and {line + 2}; "
                                          "delete one of them$"):
        load_config(path)


def test_a_duplicated_section_and_a_duplicate_in_a_flow_mapping(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(TINY_TEXT + "train:\n  max_steps: 3\n")
    first = TINY_TEXT[: TINY_TEXT.index("\ntrain:\n") + 1].count("\n") + 1
    last = TINY_TEXT.count("\n") + 1
    with pytest.raises(ConfigError, match=rf"^{path}: train is set twice at lines {first} and {last}; "):
        load_config(path)
    path, line = tiny_with(tmp_path, "kernels:\n  noise: auto\n", "kernels: {noise: torch, noise: auto,\n")
    path.write_text(path.read_text().replace("  attention: auto\n", "  attention: auto}\n", 1))
    with pytest.raises(ConfigError, match=rf"^{path}: kernels\.noise is set twice on line {line}; "):
        load_config(path)


def test_the_same_key_in_different_mappings_and_a_merge_key_are_not_duplicates(tmp_path):
    # tiny.yaml has `arch:` under model and precompute.text_encoder.
    tiny = load_config(REPO / "configs" / "tiny.yaml")
    assert tiny.model.arch and tiny.precompute.text_encoder.arch
    # A key beside a YAML merge (`<<`) overrides the merged one: that is not a duplicate.
    path, _ = tiny_with(tmp_path, "kernels:\n  noise: auto\n",
                        "kernels:\n  <<: {noise: torch, attention: torch}\n  noise: auto\n")
    path.write_text(path.read_text().replace("  attention: auto\n", "", 1))
    cfg = load_config(path)
    assert (cfg.kernels.noise, cfg.kernels.attention) == ("auto", "torch")
