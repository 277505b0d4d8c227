"""kimi-desk: a desktop long-document assistant on Kimi Linear models.

The subpackages live in the repository's top-level folders: kimi_desk.app (app/), kimi_desk.engine
(engine/), kimi_desk.kernels (kernels/) and kimi_desk.assets (assets/). Layering is one-way:
app -> engine -> kernels.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kimi-desk")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
