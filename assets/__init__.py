"""Files shipped with the app: the embedded demo model, styles, icons."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
