"""``picochat import FILE.gguf OUT_DIR``: convert llama.cpp weights to a picochat checkpoint.

The result is an ordinary checkpoint directory (config.json + model.safetensors + tokenizer.json,
plus chat_template.jinja and gguf_meta.json), so every command that takes a checkpoint takes it.
Commands also accept the GGUF file or the name ``smollm2`` directly; importing once just saves the
dequantisation at every start.
"""
from __future__ import annotations

import time


def run(args) -> int:
    from .checkpoints.gguf import import_gguf

    t0 = time.time()
    out, meta = import_gguf(args.source, args.out_dir)
    from .checkpoints.io import read_config
    config = read_config(out)
    types = ", ".join(f"{n} {k}" for k, n in sorted(meta["tensor_types"].items(), key=lambda x: -x[1]))
    print(f"imported {meta.get('name') or args.source}: {config.num_params() / 1e6:.1f}M parameters, "
          f"{config.n_layer} layers, context {config.block_size} (tensors: {types}; dequantised to fp32) "
          f"-> {out} in {time.time() - t0:.1f} s")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("import", help="convert a GGUF file (llama.cpp) to a picochat checkpoint",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a .gguf file (Llama architecture, byte-level BPE), or the name smollm2")
    p.add_argument("out_dir", help="the checkpoint directory to write (replaced atomically if it exists)")
    p.set_defaults(func=run)
