"""Loudness on target: the final MP4's AAC track, measured with ffmpeg's ebur128 filter,
is within 1 LU of the target loudness with its true peak at or below the ceiling, for
user soundtracks of every kind and for music under narration."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import imageio_ffmpeg
import pytest
from storyreel_composer.composer import Scene, VideoComposer

from storyreel.compose_options import ComposeOptions

#: name: (file name, lavfi source, seconds, options before the output)
INPUTS = {
    # -46 dBFS: needs about 30 dB of gain.
    "quiet sine": ("quiet.mp3", "aevalsrc=0.005*sin(2*PI*440*t):s=44100", 4.0, ()),
    # Full-scale white noise, clipping: far too loud, peaks at 0 dBFS.
    "clipping noise": ("noise.wav", "anoisesrc=color=white:amplitude=1:r=44100", 4.0, ()),
    # Pink noise with 3 kHz clicks twice a second: peaks far above its loudness.
    "pink noise with transients": (
        "pink.flac",
        "anoisesrc=color=pink:amplitude=0.1:r=44100",
        4.0,
        ("-af", r"aeval=val(0)+0.85*lt(mod(t\,0.5)\,0.004)*sin(2*PI*3000*t):c=same"),
    ),
    # Gliding tones in bursts with silence between: speech-like gating and crest.
    "speech-like bursts": (
        "bursts.ogg",
        r"aevalsrc=0.6*sin(2*PI*(160+80*sin(2*PI*2*t))*t)*gt(sin(2*PI*1.3*t)\,0.1):s=22050",
        5.0,
        ("-c:a", "libvorbis"),
    ),
    # One second: barely more than the 400 ms blocks loudness is measured in.
    "one-second clip": ("short.wav", "aevalsrc=0.3*sin(2*PI*660*t):s=44100", 1.0, ()),
    # Stereo, quiet, with a single full-scale click in the left channel.
    "stereo with a hot peak": (
        "hot.wav",
        r"aevalsrc=0.05*sin(2*PI*440*t)+0.99*lt(abs(t-1.5)\,0.0005)|0.05*sin(2*PI*550*t):s=48000",
        3.0,
        (),
    ),
}


def ebur128(path: Path) -> tuple[float, float]:
    """Integrated loudness (LUFS) and true peak (dBTP) of the file's first audio stream."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-i", str(path)]
    cmd += ["-map", "0:a:0", "-af", "ebur128=peak=true", "-f", "null", "-"]
    err = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    summary = err[err.rfind("Summary:") :]
    lufs = float(re.search(r"I:\s+(\S+) LUFS", summary).group(1))
    peak = float(re.search(r"Peak:\s+(\S+) dBFS", summary).group(1))
    return lufs, peak


def _check(name: str, video: Path, composer: VideoComposer) -> None:
    s = composer.settings
    lufs, peak = ebur128(video)
    # The figures of the closing note (pytest -s shows them).
    print(f"loudness {name}: {lufs:.1f} LUFS, true peak {peak:.1f} dBTP")
    assert abs(lufs - s.loudness_lufs) <= 1.0, (name, lufs)
    assert peak <= s.true_peak_db, (name, peak)


@pytest.mark.parametrize("name", list(INPUTS))
async def test_soundtracks_end_on_the_target_loudness_under_the_true_peak_ceiling(
    name, unvoiced_composer: VideoComposer, images, file_store, make_audio
):
    file_name, source, seconds, options = INPUTS[name]
    audio = make_audio(file_name, source, seconds, *options)
    audio_uri = file_store.put_file(f"uploads/tenant/x/{file_name}", audio)
    scenes = [Scene(uri, "") for uri in images[:1]]
    result = await unvoiced_composer.compose("job-loud", scenes, audio_uri)
    _check(name, file_store.path_of(result.video_uri), unvoiced_composer)


@pytest.mark.model
async def test_narration_and_music_under_it_end_on_the_target_loudness(
    narrating_composer: VideoComposer, images, file_store, make_audio
):
    # Loud, clipping music under the narration: the mix is what is normalised.
    music = make_audio("loud.wav", "anoisesrc=color=pink:amplitude=1:r=44100", 3.0)
    music_uri = file_store.put_file("uploads/tenant/x/loud.wav", music)
    scenes = [Scene(images[0], "The fox ran over the hill.")]
    options = ComposeOptions(audio_mode="music")
    result = await narrating_composer.compose("job-mix", scenes, music_uri, options=options)
    _check("narration over music", file_store.path_of(result.video_uri), narrating_composer)
    # And the narration alone.
    result = await narrating_composer.compose("job-voice", scenes)
    _check("narration", file_store.path_of(result.video_uri), narrating_composer)
