"""kimi-desk: a desktop long-document assistant on Kimi Linear models.

The subpackages live in the repository's top-level folders: kimi_desk.app (app/), kimi_desk.engine
(engine/), kimi_desk.kernels (kernels/) and kimi_desk.assets (assets/). Layering is one-way:
app -> engine -> kernels. The measurements, kimi_desk.bench (packaging/bench/), stand apart: they import
the product, and only `kimi-desk bench` (app/cli.py) imports them.
"""

import os
from importlib.metadata import PackageNotFoundError, version

# PyTorch's CPU threads (GNU OpenMP) spin between parallel regions by default. A desktop shares its
# cores with the user's other programs: when one of our threads is descheduled, the others spin out
# their time slices at every barrier, and on a busy 2-core machine reading ran 5-10 times slower than
# with threads that sleep while they wait. OpenMP reads this once, when PyTorch is first imported;
# whoever sets it in the environment first decides.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    __version__ = version("kimi-desk")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
