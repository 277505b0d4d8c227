"""A GGUF of the Kimi Linear model at full depth, made from a shallow one without a bf16 checkpoint.

    python packaging/bench/llama_cpp/deepen_gguf.py SHALLOW.gguf DEEP.gguf --layers 27 [--llama-cpp DIR]

The whole 48B model in bf16 is 98 GB, more than the GPU machine's disk holds beside its GGUF, so a
random checkpoint at full depth cannot go through llama.cpp's converter there. This script takes a
quantized GGUF of a few layers (random_48b.py, convert.py, llama-quantize: dense layer 0, KDA layers,
an MLA layer last) and writes one of `--layers` layers: layer 0 as it is, every other layer a copy of
the shallow model's last layer of the same kind (KDA or MLA), with MLA where the 48B model has it
(every fourth layer, 1-based, and the last). Copies of one layer's quantized bytes are valid weights
that llama.cpp loads and runs; the speed of a layer does not depend on its values. Metadata arrays with
one entry per layer (llama.cpp marks MLA layers by a non-zero `head_count_kv`) are extended the same way.
Measurement code: nothing here is imported by kimi-desk. gguf-py comes from build.sh's source tree.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")


def mla_layers(layers: int) -> set[int]:
    """0-based indices of the MLA layers in a model of `layers` layers, placed as in the 48B model."""
    return {n - 1 for n in range(4, layers + 1, 4)} | {layers - 1}


def source_layers(shallow_kinds: list[bool], layers: int) -> list[int]:
    """For each layer of the deep model, the shallow layer it copies: 0 for 0, else the shallow model's
    last layer of the same kind (True = MLA)."""
    last = {
        kind: max(i for i, k in enumerate(shallow_kinds) if k == kind and i > 0)
        for kind in (True, False)
        if any(k == kind for k in shallow_kinds[1:])
    }
    deep = mla_layers(layers)
    out = [0]
    for i in range(1, layers):
        kind = i in deep
        if kind not in last:
            raise SystemExit(f"deepen_gguf.py: the shallow model has no {'MLA' if kind else 'KDA'} layer past layer 0")
        out.append(last[kind])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shallow", type=Path)
    parser.add_argument("deep", type=Path)
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--llama-cpp", type=Path, default=REPO / ".bench" / "llama-cuda")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.llama_cpp / "src" / "llama.cpp" / "gguf-py"))
    import gguf

    reader = gguf.GGUFReader(args.shallow)
    arch = reader.fields["general.architecture"].contents()
    shallow_layers = int(reader.fields[f"{arch}.block_count"].contents())
    kv_heads = reader.fields[f"{arch}.attention.head_count_kv"].contents()
    if not isinstance(kv_heads, list) or len(kv_heads) != shallow_layers:
        raise SystemExit("deepen_gguf.py: head_count_kv is not a per-layer array; is this a Kimi Linear GGUF?")
    sources = source_layers([h > 0 for h in kv_heads], args.layers)

    writer = gguf.GGUFWriter(args.deep, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == f"{arch}.block_count":
            value = args.layers
        elif isinstance(value, list) and len(value) == shallow_layers and vtype == gguf.GGUFValueType.ARRAY:
            value = [value[s] for s in sources]
        writer.add_key_value(field.name, value, vtype, sub_type=sub_type)

    by_layer: dict[int, list] = {}
    others = []
    for tensor in reader.tensors:
        match = LAYER_NAME.match(tensor.name)
        if match:
            by_layer.setdefault(int(match.group(1)), []).append((match.group(2), tensor))
        else:
            others.append((tensor.name, tensor))
    plan = list(others[:1])  # token embedding first, as the converter writes it
    for i, s in enumerate(sources):
        plan += [(f"blk.{i}.{suffix}", tensor) for suffix, tensor in by_layer[s]]
    plan += others[1:]
    for name, tensor in plan:
        writer.add_tensor_info(name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = 0
    for _, tensor in plan:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
        total += tensor.data.nbytes
    writer.close()
    print(
        f"deepen_gguf.py: {args.deep} ({total / 2**30:.2f} GiB of tensors, {args.layers} layers; "
        f"MLA at {sorted(i + 1 for i in mla_layers(args.layers))}, 1-based)"
    )


if __name__ == "__main__":
    main()
