"""A PNG of an HTML page, rendered by headless Chromium (Debian's `chromium` package)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from gradelab.errors import GradingEnvironmentError

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_TIMEOUT = 60.0  # seconds; a cold start on a loaded machine takes a few


class ScreenshotError(GradingEnvironmentError):
    """Chromium is installed but could not render the page."""


def chromium_command(user_data_dir: Path, *arguments: str) -> list[str]:
    """Headless Chromium with a throwaway profile and no background network traffic."""
    return [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={user_data_dir}", *arguments]


def screenshot(html: Path, png: Path, *, width: int = 1280, height: int = 2000) -> bool:
    """Render `html` to `png` with headless Chromium; False if Chromium is not installed."""
    if shutil.which(str(CHROMIUM)) is None:
        return False
    png = png.resolve()
    png.unlink(missing_ok=True)  # so a stale file cannot pass for a fresh screenshot
    with tempfile.TemporaryDirectory(prefix="gradelab-chromium-") as profile:
        try:
            proc = subprocess.run(
                chromium_command(Path(profile), f"--screenshot={png}", f"--window-size={width},{height}",
                                 html.resolve().as_uri()),
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise ScreenshotError(f"chromium did not screenshot {html} within {CHROMIUM_TIMEOUT:g} s") from None
    if proc.returncode != 0 or not png.is_file():
        tail = "; ".join(proc.stderr.splitlines()[-3:])
        raise ScreenshotError(f"chromium could not screenshot {html} (exit {proc.returncode}): {tail}")
    return True
