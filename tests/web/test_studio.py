"""The studio page in a real headless Chromium, driven by Playwright, on the whole stack.

Every service runs as its own process (tests/support.py ``started_stack``): the tiny offline
diffusion model, piper narration, ffmpeg, and the LLM service's TGI backend answered by the
TGI test double so that a storyboard costs nothing. The page is the gateway's own (its web
port: the studio's files and gRPC-Web on one origin); the gateway asks for an API key. A
second gateway, alone and with no keys, shows that the page then asks for none.

One browser tab follows one story from the prompt to the second version of its video; the
tests run in order and share it. Each step leaves a screenshot under the run's base temp
folder (``screenshots/``); the folder and the time from pressing Create to the first scene
image are printed in the summary (conftest.py).
"""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from model_server_doubles import TGITestDouble
from support import REPO, service_process, started_stack, wav_bytes

from storyreel.gateway.v1 import gateway_pb2 as pb
from storyreel.gateway.v1 import gateway_pb2_grpc
from storyreel.types.v1 import types_pb2

pytestmark = [pytest.mark.e2e]

KEY = "studio-key"
METADATA = (("authorization", f"Bearer {KEY}"),)
FPS = 12
WAIT_MS = 180_000
BROWSER_PKG = REPO / "tests" / "web"


def chromium_executable() -> str:
    """The headless Chromium: $STORYREEL_CHROMIUM, else the one `make browser` unpacks from
    npm @sparticuz/chromium (unpacked here if only installed), else a system `chromium`."""
    named = os.environ.get("STORYREEL_CHROMIUM")
    if named:
        return named
    unpacked = BROWSER_PKG / "node_modules" / ".chromium" / "chromium"
    if not unpacked.exists() and (BROWSER_PKG / "node_modules" / "@sparticuz").is_dir():
        node = shutil.which("node")
        if node:
            subprocess.run(
                [node, str(BROWSER_PKG / "chromium.mjs")], check=True, timeout=300,
                capture_output=True,
            )  # fmt: skip
    if unpacked.exists():
        return str(unpacked)
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("no headless Chromium: run `make browser` (npm ci in tests/web)")


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's screenshots/ folder (printed in the summary, see conftest.py)."""
    folder = tmp_path_factory.getbasetemp() / "screenshots"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def tgi():
    double = TGITestDouble(schema_answers=True).start()
    yield double
    double.gate.set()
    double.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tgi: TGITestDouble):
    env = {
        "STORYREEL_LLM_BACKEND": "tgi",
        "STORYREEL_LLM_TGI_URL": tgi.url,
        "STORYREEL_GATEWAY_API_KEYS": json.dumps({"studio": [KEY]}),
        "STORYREEL_GATEWAY_RENDER_WIDTH": "64",
        "STORYREEL_GATEWAY_RENDER_HEIGHT": "64",
        "STORYREEL_GATEWAY_VIDEO_WIDTH": "192",
        "STORYREEL_GATEWAY_VIDEO_HEIGHT": "144",
        "STORYREEL_GATEWAY_VIDEO_FPS": str(FPS),
    }
    with started_stack(tmp_path_factory.mktemp("studio"), env) as local:
        assert local.web_url, "the gateway serves no web port"
        yield local


@pytest.fixture(scope="module")
def stub(stack):
    with grpc.insecure_channel(stack.gateway_address) as channel:
        yield gateway_pb2_grpc.StoryReelServiceStub(channel)


def get_job(stub, job_id: str) -> pb.Job:
    return stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=METADATA, timeout=30).job


def browser_env(executable: str) -> dict[str, str] | None:
    """The environment for the unpacked Chromium: on a machine without NSS or expat, the
    copies @sparticuz/chromium ships (chromium.mjs unpacks them beside the binary)."""
    bundled = Path(executable).parent / "al2023" / "lib"
    if not bundled.is_dir() or all(ctypes.util.find_library(n) for n in ("nss3", "expat")):
        return None
    paths = [str(bundled), *filter(None, [os.environ.get("LD_LIBRARY_PATH")])]
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(paths)}


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = chromium_executable()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable,
            args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"],
            env=browser_env(executable),
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, stack, screenshots):
    """One tab on the studio, past the API key prompt (entered once, kept for the tab)."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    console: list[str] = []  # the page's console and uncaught errors, kept beside the shots
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
    # When the first scene image of the page is shown (performance.now(), page time).
    page.add_init_script(
        """new MutationObserver(() => {
             if (window.firstImageAt === undefined &&
                 document.querySelector('#scenes-list img[src^="blob:"]'))
               window.firstImageAt = performance.now();
           }).observe(document, {subtree: true, childList: true, attributes: true});"""
    )
    page.goto(stack.web_url)
    expect(page.locator("#access")).to_be_visible()
    page.get_by_label("API key", exact=True).fill(KEY)
    page.get_by_role("button", name="Use this key").click()
    expect(page.locator("#connection")).to_contain_text("Connected")
    yield page
    context.close()
    (screenshots / "console.log").write_text("\n".join(console) + "\n")


def shot(page, screenshots: Path, name: str) -> None:
    page.screenshot(path=str(screenshots / f"{name}.png"), full_page=True)


#: The story the tests follow, shared in order.
STORY: dict[str, str] = {}


def test_1_create_a_two_scene_job_from_the_page(page, screenshots, stub, record_property):
    from playwright.sync_api import expect

    record_property("studio screenshots", str(screenshots))
    page.get_by_label("Prompt", exact=True).fill("A lighthouse keeper befriends a lost whale")
    page.get_by_label("Scenes", exact=True).fill("2")
    page.get_by_label("Style", exact=True).fill("watercolor")
    page.get_by_label("Captions", exact=True).select_option(label="Files only (clean picture)")
    started = page.evaluate("performance.now()")
    page.get_by_role("button", name="Create video").click()
    expect(page.locator("#job-id")).not_to_be_empty()
    job_id = page.locator("#job-id").inner_text()
    STORY.update(job_id=job_id, started=str(started))
    assert page.url.endswith(f"#job={job_id}")  # a reload finds the job again
    job = get_job(stub, job_id)
    assert job.scene_count == 2
    assert job.style == "watercolor"
    shot(page, screenshots, "1-created")


def test_2_a_scene_image_appears_before_the_job_ends(page, screenshots, stub, record_property):
    from playwright.sync_api import expect

    first = page.locator('#scenes-list img[src^="blob:"]').first
    expect(first).to_be_visible()
    # The job's state (from its WatchJob stream) when the page showed the picture.
    assert first.get_attribute("data-shown-while") == "running"
    shown_at = page.evaluate("window.firstImageAt")
    seconds = (shown_at - float(STORY["started"])) / 1000
    record_property("studio time to first scene image", f"{seconds:.2f} s from pressing Create")
    shot(page, screenshots, "2-first-scene")


def test_3_the_video_plays_with_its_duration_and_captions(page, screenshots, stub):
    from playwright.sync_api import expect

    # Progress survives a reload: the tab finds its job again from the URL.
    page.reload()
    expect(page.locator("#job-id")).to_have_text(STORY["job_id"])
    video = page.locator("#video")
    expect(page.locator("#result")).to_be_visible()
    page.wait_for_function("() => document.querySelector('#video').readyState >= 1")
    job = get_job(stub, STORY["job_id"])
    assert job.state == pb.JOB_STATE_DONE, job.error
    assert video.get_attribute("data-uri") == job.video_uri
    duration = page.evaluate("document.querySelector('#video').duration")
    assert abs(duration - job.duration_s) <= 2 / FPS, (duration, job.duration_s)
    # It plays: time moves on.
    page.evaluate("(() => { const v = document.querySelector('#video'); v.muted = true; "
                  "return v.play(); })()")  # fmt: skip
    page.wait_for_function("() => document.querySelector('#video').currentTime > 0.2")
    # The captions: a WebVTT track, loaded, with cues.
    page.wait_for_function(
        "() => { const t = document.querySelector('#video track');"
        " return t && t.readyState === 2 && t.track.cues && t.track.cues.length > 0; }"
    )
    cues = page.evaluate("document.querySelector('#video track').track.cues.length")
    assert cues >= 1
    assert (
        page.get_by_role("link", name="Download the MP4").get_attribute("href").startswith("blob:")
    )
    expect(page.get_by_role("link", name="Download the captions (WebVTT)")).to_be_visible()
    expect(page.locator("#poster")).to_have_attribute("src", re.compile("^blob:"))
    expect(page.locator("#contact-sheet")).to_be_visible()
    page.evaluate("document.querySelector('#video').pause()")
    STORY["video_uri"] = job.video_uri
    shot(page, screenshots, "3-video")


def test_4_edit_scene_one_narration_gives_a_new_version(page, screenshots, stub):
    from playwright.sync_api import expect

    line = "At first, the keeper was alone with the sea."
    narration = page.get_by_label("Scene 1 narration", exact=True)
    narration.fill(line)
    page.get_by_role("button", name="Save the storyboard").click()
    video = page.locator("#video")
    expect(video).not_to_have_attribute("data-uri", STORY["video_uri"])
    expect(page.locator("#versions li")).to_have_count(2)
    job = get_job(stub, STORY["job_id"])
    assert job.state == pb.JOB_STATE_DONE, job.error
    assert job.generation == 1
    assert job.storyboard.scenes[0].narration == line
    assert video.get_attribute("data-uri") == job.video_uri != STORY["video_uri"]
    expect(page.locator("#versions li").first).to_contain_text("Version 2 (current)")
    shot(page, screenshots, "4-new-version")
    # The picture of the README (docs/studio.png): the top of the page.
    page.wait_for_function("() => document.querySelector('#video').readyState >= 3")
    clip = {"x": 0, "y": 0, "width": 1280, "height": 1400}
    page.screenshot(path=str(screenshots / "studio.png"), full_page=True, clip=clip)


def test_5_cancel_a_running_job(page, screenshots, stub, tgi):
    """With a soundtrack of one's own, too: the page uploads it (UploadAudio) first."""
    from playwright.sync_api import expect

    tgi.gate.clear()  # the storyboard stage waits on the LLM until the test lets it go
    try:
        page.get_by_label("Prompt", exact=True).fill("A fox crosses a frozen river")
        page.get_by_label("Scenes", exact=True).fill("2")
        tune = {"name": "tune.wav", "mimeType": "audio/wav", "buffer": wav_bytes(2.0)}
        page.get_by_label("Your own audio file").set_input_files(tune)
        page.get_by_label("It is", exact=True).select_option(label="Music under the narration")
        page.get_by_role("button", name="Create video").click()
        expect(page.locator("#write-status")).to_contain_text("Uploaded tune.wav: 2.0 s")
        expect(page.locator("#watch")).to_have_attribute("data-state", "running")
        job_id = page.locator("#job-id").inner_text()
        assert job_id != STORY["job_id"]
        page.get_by_role("button", name="Cancel this job").click()
        expect(page.locator("#watch")).to_have_attribute("data-state", "cancelled")
        expect(page.locator(f'#jobs-table tr[data-job-id="{job_id}"] .state')).to_have_text(
            "cancelled"
        )
    finally:
        tgi.gate.set()
    job = get_job(stub, job_id)
    assert job.state == pb.JOB_STATE_CANCELLED
    assert job.audio_uri and job.audio_mode == types_pb2.AUDIO_MODE_MUSIC
    shot(page, screenshots, "5-cancelled")


def test_6_a_wrong_api_key_shows_the_gateway_refusal(browser, stack, screenshots):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 420, "height": 800})  # a phone's width
    try:
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(stack.web_url)
        message = page.locator("#access-message")
        expect(message).to_contain_text("UNAUTHENTICATED: missing API key")
        # Asked once, with the keyboard: the key field has the focus, Enter sends it.
        field = page.get_by_role("textbox", name="API key")
        expect(field).to_be_focused()
        page.keyboard.type("not-the-key")
        page.keyboard.press("Enter")
        expect(message).to_have_text("UNAUTHENTICATED: unknown API key")
        # A phone's width: one column.
        columns = page.evaluate(
            "() => getComputedStyle(document.querySelector('.layout')).gridTemplateColumns"
        )
        assert len(columns.split()) == 1, columns
        shot(page, screenshots, "6-wrong-key")
    finally:
        context.close()


def test_7_review_edit_approve_then_redraw_one_scene(page, screenshots, stub):
    """The storyboard first: review, edit scene 2's narration, approve; then redraw scene 1
    of the finished video, which composes a new version."""
    from playwright.sync_api import expect

    page.get_by_label("Prompt", exact=True).fill("A girl teaches a robot to paint")
    page.get_by_label("Scenes", exact=True).fill("2")
    page.get_by_label("Your own audio file").set_input_files([])
    page.get_by_label("Let me review the storyboard before any image is drawn").check()
    page.get_by_role("button", name="Create video").click()
    watch = page.locator("#watch")
    expect(watch).to_have_attribute("data-state", "review")
    job_id = page.locator("#job-id").inner_text()
    assert not get_job(stub, job_id).images  # nothing drawn before approval
    line = "The robot mixed blue and yellow and was amazed."
    page.get_by_label("Scene 2 narration", exact=True).fill(line)
    shot(page, screenshots, "7-review")
    page.get_by_role("button", name="Approve and render").click()
    expect(watch).to_have_attribute("data-state", "done")
    job = get_job(stub, job_id)
    assert job.state == pb.JOB_STATE_DONE, job.error
    assert job.review and job.storyboard.scenes[1].narration == line
    first_video = job.video_uri
    expect(page.locator("#video")).to_have_attribute("data-uri", first_video)

    page.get_by_role("button", name="Redraw scene 1").click()
    expect(page.locator("#video")).not_to_have_attribute("data-uri", first_video)
    expect(page.locator("#versions li")).to_have_count(2)
    job = get_job(stub, job_id)
    assert job.state == pb.JOB_STATE_DONE and job.generation == 1, job.error
    shot(page, screenshots, "7-redrawn")


@pytest.fixture(scope="module")
def keyless_url(tmp_path_factory: pytest.TempPathFactory):
    """A gateway alone with no API keys, on loopback (as `storyreel serve` starts it): its page.

    Listing jobs needs no upstream service, so none is started."""
    data = tmp_path_factory.mktemp("keyless")
    web_port_file = data / "web.port"
    nowhere = "127.0.0.1:9"  # the discard port: no job here reaches a service
    env = {
        "STORYREEL_GATEWAY_WEB_PORT": "0",
        "STORYREEL_GATEWAY_WEB_PORT_FILE": str(web_port_file),
        "STORYREEL_GATEWAY_DATABASE_URL": f"sqlite+aiosqlite:///{data / 'gateway.db'}",
        "STORYREEL_STORAGE_URL": (data / "artifacts").as_uri(),
        "STORYREEL_GATEWAY_LLM_ADDRESS": nowhere,
        "STORYREEL_GATEWAY_DIFFUSION_ADDRESS": nowhere,
        "STORYREEL_GATEWAY_COMPOSER_ADDRESS": nowhere,
        "STORYREEL_GATEWAY_API_KEYS": "{}",  # none, whatever this environment says
    }
    with (
        (data / "gateway.log").open("w") as log,
        service_process(
            "storyreel_gateway", data / "grpc.port", env, stdout=log, stderr=log, cwd=data
        ) as process,
    ):
        deadline = time.monotonic() + 60
        while not (web_port_file.exists() and web_port_file.read_text().strip()):
            assert process.poll() is None, (data / "gateway.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the gateway's web port did not open"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{web_port_file.read_text().strip()}/"
        process.terminate()
        process.wait(timeout=30)


def test_8_a_gateway_without_keys_asks_for_none(browser, keyless_url, screenshots):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(keyless_url)
        expect(page.locator("#connection")).to_have_text("Connected.")
        expect(page.locator("#access")).to_be_hidden()
        expect(page.get_by_role("button", name="Change the API key")).to_be_hidden()
        expect(page.locator("#jobs-empty")).to_be_visible()
        shot(page, screenshots, "8-no-key-needed")
    finally:
        context.close()
