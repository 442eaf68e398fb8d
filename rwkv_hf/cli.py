"""The ``rwkv-hf`` command line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwkv-hf", description="RWKV models for Hugging Face transformers")
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="convert an official RWKV .pth checkpoint into a transformers folder")
    convert.add_argument("checkpoint", help="the RWKV-LM .pth file")
    convert.add_argument("output_dir", help="folder to write (config.json, model.safetensors, code, tokenizer)")
    convert.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    convert.add_argument("--tokenizer", default="auto", help="auto, world, 20b or none (default: auto, by vocab size)")
    convert.add_argument(
        "--overwrite",
        action="store_true",
        help="convert into a non-empty folder: replaces the converter's own files (and removes those an earlier "
        "rwkv_hf conversion left there), never touches anything else",
    )

    from .chat_cli import add_chat_parser
    from .demo import add_demo_parser

    add_chat_parser(sub)
    add_demo_parser(sub)
    sub.add_parser("build-kernels", help="compile the CUDA WKV extension now (ahead of time) into the user cache")
    export = sub.add_parser("export", help="write a converted folder in another runtime's layout")
    export.add_argument("folder", help="an rwkv_hf folder (converted or saved)")
    export.add_argument("output", help="the .pth file (--to official) or the folder (--to rwkv) to write")
    export.add_argument(
        "--to", required=True, choices=["official", "rwkv"],
        help="official: an RWKV-LM .pth (ChatRWKV, the rwkv package); rwkv: transformers' built-in RWKV-4 folder",
    )
    serve = sub.add_parser(
        "serve",
        help="`transformers serve` (OpenAI-compatible server) with rwkv_hf imported, so that it loads a folder's "
        "RwkvHfForCausalLM; arguments go to transformers serve (needs pip install 'transformers[serving]')",
        add_help=False,
    )
    serve.add_argument("serve_args", nargs=argparse.REMAINDER)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "convert":
        from .convert_rwkv_hf import CheckpointError, main_convert

        try:
            return main_convert(args)
        except (CheckpointError, ValueError, OSError) as err:  # OSError: unusable destination, disk full, ...
            print(f"rwkv-hf convert: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            # the conversion is staged in a hidden sibling folder and moved into place in one step
            print(f"rwkv-hf convert: interrupted; {args.output_dir} was not left half-written", file=sys.stderr)
            return 130
    if args.command == "chat":
        from .chat_cli import main_chat

        return main_chat(args)
    if args.command == "demo":
        from .demo import main_demo

        return main_demo(args)
    if args.command == "export":
        return main_export(args)
    if args.command == "serve":
        return main_serve(args.serve_args)
    if args.command == "build-kernels":
        from .build_kernels import main as build_main

        return build_main([])
    return 1


def main_export(args) -> int:
    import os

    import torch

    from .convert_rwkv_hf import export_official_state_dict
    from .layouts import LayoutError, export_transformers_rwkv4
    from .modeling_rwkv_hf import RwkvForCausalLM

    if os.path.exists(args.output):
        print(f"rwkv-hf export: error: {args.output} exists; pick a new path (nothing was written)", file=sys.stderr)
        return 2
    try:
        model = RwkvForCausalLM.from_pretrained(args.folder)
        if args.to == "official":
            torch.save(export_official_state_dict(model), args.output)
        else:
            export_transformers_rwkv4(model, args.output)
    except (LayoutError, ValueError, OSError) as err:
        print(f"rwkv-hf export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


def main_serve(serve_args) -> int:
    """transformers' own server, started after ``import rwkv_hf``: it loads a folder with
    ``getattr(transformers, config.architectures[0])``, which resolves RwkvHfForCausalLM only once imported."""
    import rwkv_hf  # noqa: F401  (registers the classes and their names on transformers)

    try:
        from transformers.cli.transformers import main as transformers_main
    except ImportError as err:
        print(f"rwkv-hf serve: error: this transformers has no `transformers serve` command ({err})", file=sys.stderr)
        return 2
    sys.argv = ["transformers", "serve", *serve_args]
    try:
        transformers_main()
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
