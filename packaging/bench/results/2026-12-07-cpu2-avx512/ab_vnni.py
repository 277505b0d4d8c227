"""Ours alone on the 4-layer slice with the int4 products of many rows in AVX-512 VNNI or AVX2:
python ab_vnni.py on|off CHECKPOINT    (the JSON of slice_48b.py --ours-only on its last line)"""

import runpy
import sys
from pathlib import Path

from kimi_desk.kernels.quant import avx2

print("avx512:", avx2.library().use_avx512_products(int(sys.argv[1] == "on")), file=sys.stderr)
script = Path(__file__).resolve().parents[2] / "cpu" / "slice_48b.py"
sys.argv = [str(script), sys.argv[2], "--ours-only", "--depths", "0", "--gen", "8", "--threads", "2"]
runpy.run_path(str(script), run_name="__main__")
