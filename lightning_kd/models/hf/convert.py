"""``python -m lightning_kd.models.hf.convert GGUF OUTPUT_DIR``: a GGUF file as a safetensors
Hugging Face directory, written once (see :func:`lightning_kd.models.hf.gguf.convert_gguf`).

``GGUF`` is a ``.gguf`` path or ``pkg://<module>/<file>.gguf``; the dequantisation shows
transformers' progress bar. Exit status 0 on success (also when the directory was already
converted), 1 with a one-line message for a bad argument.
"""

from __future__ import annotations

import argparse
import sys
import time

from lightning_kd.models.hf.gguf import convert_gguf, is_converted


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and convert; the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_kd.models.hf.convert",
        description="Dequantise a GGUF file once into a safetensors Hugging Face directory.",
    )
    parser.add_argument("gguf", help="a .gguf file or pkg://<module>/<file>.gguf")
    parser.add_argument("output_dir", help="the Hugging Face directory to write")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier conversion")
    args = parser.parse_args(argv)
    if is_converted(args.output_dir) and not args.overwrite:
        print(f"already converted: {args.output_dir}")
        return 0
    start = time.perf_counter()
    try:
        directory = convert_gguf(args.gguf, args.output_dir, args.dtype, args.overwrite)
    except ValueError as error:
        print(f"convert: error: {error}", file=sys.stderr)
        return 1
    print(f"converted {args.gguf} -> {directory} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
