"""The studio's committed front-end is what its sources build: the TypeScript types are
generated from today's public protos, and studio.js is the bundle of web/src.

Both are committed so that `pip install` and `storyreel serve` need no Node; `make studio`
rebuilds them. A change to the protos or to web/src without `make studio` fails here.
"""

from __future__ import annotations

import filecmp
import shutil
import subprocess
from pathlib import Path

import pytest
from support import REPO

WEB = REPO / "web"
STUDIO = REPO / "gateway" / "storyreel_gateway" / "studio"
BUF = REPO / "tools" / "buf" / "node_modules" / ".bin" / "buf"


@pytest.fixture(scope="module")
def node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (Node 18 or later builds the studio)")
    if not (WEB / "node_modules" / "esbuild").is_dir():
        pytest.fail("the studio's toolchain is missing: run `make studio-deps` (npm ci in web/)")
    return node


def _files(root: Path) -> dict[str, Path]:
    return {str(path.relative_to(root)): path for path in root.rglob("*") if path.is_file()}


def test_generated_types_match_the_protos(node: str, tmp_path: Path) -> None:
    if not BUF.exists():
        pytest.fail("buf is missing: run `make buf` (npm ci in tools/buf)")
    subprocess.run(
        [str(BUF), "generate", "--template", "web/buf.gen.yaml", "-o", str(tmp_path),
         "--path", "protos/storyreel/gateway/v1", "--path", "protos/storyreel/types/v1"],
        cwd=REPO, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    fresh, committed = _files(tmp_path / "web" / "src" / "gen"), _files(WEB / "src" / "gen")
    assert sorted(fresh) == sorted(committed), "run `make studio`"
    stale = [name for name in fresh if not filecmp.cmp(fresh[name], committed[name], False)]
    assert not stale, f"web/src/gen is stale ({', '.join(stale)}): run `make studio`"


def test_committed_bundle_is_a_fresh_build(node: str, tmp_path: Path) -> None:
    out = tmp_path / "studio.js"
    subprocess.run(
        [node, "build.mjs", "--outfile", str(out)],
        cwd=WEB, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert out.read_bytes() == (STUDIO / "studio.js").read_bytes(), (
        f"{STUDIO / 'studio.js'} is not the build of web/src: run `make studio`"
    )


def test_the_page_fetches_nothing_from_elsewhere() -> None:
    """No CDN, no web fonts: every URL the page's files name is on the page's own origin."""
    for name in ("index.html", "studio.css", "studio.js"):
        text = (STUDIO / name).read_text()
        assert "@import" not in text or name == "studio.js", name
        assert "fonts.googleapis" not in text and "cdn." not in text, name
    html = (STUDIO / "index.html").read_text()
    assert "http://" not in html and "https://" not in html
    assert "<style" not in html and " style=" not in html  # the gateway's CSP: style-src 'self'
    assert "<script>" not in html  # script-src 'self': the one script is a file
