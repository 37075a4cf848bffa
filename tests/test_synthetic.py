"""The synthetic clips: both directions of one first frame, so that only the caption tells them apart."""

from __future__ import annotations

import json

import numpy as np
import pytest

from i2v.data.synthetic import SPECS_FILE, make_clips, render


def test_two_directions_per_frame_share_the_first_frame(tmp_path):
    specs = make_clips(str(tmp_path), 6, seed=5, frames=5, width=32, height=32, directions_per_frame=2)
    for a, b in zip(specs[0::2], specs[1::2]):
        assert b == a.reversed() and b.direction != a.direction
        assert np.array_equal(render(a, 0, 32, 32), render(b, 0, 32, 32))
        assert not np.array_equal(render(a, 4, 32, 32), render(b, 4, 32, 32))
    assert len({(s.x, s.y, s.colour, s.shape) for s in specs}) == 3
    captions = [(tmp_path / f"clip-{i:05d}.txt").read_text() for i in range(6)]
    assert captions == [s.caption for s in specs] and len(set(captions)) == 6
    assert json.loads((tmp_path / SPECS_FILE).read_text())["directions_per_frame"] == 2


def test_one_direction_per_frame_draws_every_clip(tmp_path):
    specs = make_clips(str(tmp_path), 4, seed=5, frames=5, width=32, height=32)
    assert len({(s.x, s.y, s.colour, s.shape) for s in specs}) == 4


def test_other_counts_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--directions-per-frame"):
        make_clips(str(tmp_path), 4, frames=5, width=32, height=32, directions_per_frame=3)
