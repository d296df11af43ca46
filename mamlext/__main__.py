"""Command line: python -m mamlext info | demo"""
import argparse
import json
import sys


def _print_info(as_json: bool) -> None:
    from mamlext import backend_info

    info = backend_info()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    yes = lambda flag: "yes" if flag else "no"  # noqa: E731
    print(f"mamlext {info['mamlext_version']}, torch {info['torch_version']} (CUDA {info['torch_cuda']})")
    if info["extension_loaded"]:
        print(f"compiled extension: loaded (built against torch {info['extension_built_with_torch']}"
              f"{', debug build' if info['debug_build'] else ''})")
    else:
        print(f"compiled extension: NOT loaded: {info['extension_error']}")
    print(f"CPU kernels:  {yes(info['cpu_kernels'])}")
    print(f"CUDA kernels: {yes(info['cuda_kernels'])}"
          + (f" (archs {', '.join(info['cuda_archs'])})" if info["cuda_kernels"] else ""))
    print(f"GPU visible:  {', '.join(info['gpus']) if info['gpu_visible'] else 'no'}")
    for device, backend in info["backend"].items():
        print(f"ops on {device:4s} -> {backend}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mamlext", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, compiled kernels and the backend used on each device")
    info.add_argument("--json", action="store_true", help="print as JSON")
    demo = commands.add_parser("demo", help="a short sinusoid MAML run with mamlext.MAML")
    demo.add_argument("--iterations", type=int, default=300)
    demo.add_argument("--meta-batch", type=int, default=25)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "info":
        _print_info(args.json)
    elif args.command == "demo":
        from mamlext import demo as demo_module

        for name in ("iterations", "meta_batch"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be at least 1")
        demo_module.run(iterations=args.iterations, meta_batch=args.meta_batch, seed=args.seed,
                        log_every=max(1, args.iterations // 6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
