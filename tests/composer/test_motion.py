"""Ken Burns moves: chosen from the seed, within the picture, moderate."""

from __future__ import annotations

import itertools

import pytest
from storyreel_composer.motion import KINDS, Move, choose_moves


def test_the_same_seed_gives_the_same_moves_and_other_seeds_other_moves():
    assert choose_moves(42, 12, 1.12) == choose_moves(42, 12, 1.12)
    others = {tuple(choose_moves(seed, 12, 1.12)) for seed in range(20)}
    assert len(others) == 20


def test_every_kind_is_used_and_no_scene_repeats_the_previous_kind():
    moves = [move for seed in range(10) for move in choose_moves(seed, 12, 1.12)]
    assert {move.kind for move in moves} == set(KINDS)
    for seed in range(10):
        kinds = [move.kind for move in choose_moves(seed, 24, 1.12)]
        assert all(a != b for a, b in itertools.pairwise(kinds))


@pytest.mark.parametrize("seed", range(5))
def test_moves_stay_inside_the_picture_and_zoom_at_most_the_setting(seed):
    width, height = 1920, 1080
    for move in choose_moves(seed, 24, 1.12):
        for progress in (0, 0.25, 0.5, 0.75, 1):
            left, top, zoom = move.window(progress, width, height)
            assert 1.0 <= zoom <= 1.12 + 1e-9
            assert -1e-9 <= left <= width - width / zoom + 1e-9
            assert -1e-9 <= top <= height - height / zoom + 1e-9


def test_zoom_in_grows_zoom_out_shrinks_and_pans_cross_the_slack():
    zoom_in = Move("zoom_in", 1.0, 1.2, 0.5, 0.5, 0.5, 0.5)
    assert zoom_in.window(0, 100, 100)[2] == 1.0 and zoom_in.window(1, 100, 100)[2] == 1.2
    pan_right = Move("pan_right", 1.25, 1.25, 0.0, 1.0)
    assert pan_right.window(0, 100, 100)[0] == 0.0
    assert pan_right.window(1, 100, 100)[0] == pytest.approx(20.0)  # 100 - 100 / 1.25
    assert pan_right.window(0.5, 100, 100)[1] == pytest.approx(10.0)  # centred vertically


def test_zoompan_filter_plays_the_move_over_the_shot_and_holds_its_start_on_lead_frames():
    text = Move("pan_left", 1.1, 1.1, 1.0, 0.0).zoompan(48, 1280, 720, 24, lead=1)
    assert text == (
        "zoompan=z='1.100000':x='(1.000000-1.000000*clip((on-1)/47,0,1))*(iw-iw/zoom)'"
        ":y='0.500000*(ih-ih/zoom)':d=49:s=1280x720:fps=24"
    )
