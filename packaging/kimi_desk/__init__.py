"""kimi-desk: a desktop long-document assistant on Kimi Linear models.

The subpackages live in the repository's top-level folders: kimi_desk.app (app/), kimi_desk.engine
(engine/), kimi_desk.kernels (kernels/) and kimi_desk.assets (assets/). Layering is one-way:
app -> engine -> kernels. The measurements, kimi_desk.bench (packaging/bench/), stand apart: they import
the product, and only `kimi-desk bench` (app/cli.py) imports them.
"""

from importlib.metadata import PackageNotFoundError, version

from kimi_desk.engine.cpu_threads import choose_wait

# How PyTorch's CPU threads (GNU OpenMP) wait between parallel regions: OpenMP reads it once, when
# PyTorch is first imported, so it is set before anything imports PyTorch (engine/cpu_threads.py).
choose_wait()

try:
    __version__ = version("kimi-desk")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
