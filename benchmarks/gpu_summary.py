"""The single summary of benchmarks/gpu_check.sh: $OUT/summary.json.

    python benchmarks/gpu_summary.py --bandwidth OUT   # measure the yardstick: device-to-device copy bandwidth
    python benchmarks/gpu_summary.py OUT               # write OUT/summary.json from what the stages left in OUT

summary.json holds, in this order: "stages" (each stage of the script in the order it ran: name, verdict "passed",
"failed", "timed out" or "skipped", seconds, exit status; for a test stage the counts of passed / failed / skipped
tests and the ids of the failing ones, from its junit xml), "bandwidth" (device-to-device copy, GB/s: what the
memory-bound kernels are measured against) and "benchmarks" (every benchmark's JSON, by file name).
"""
import argparse
import json
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

STAGES_FILE = "stages.tsv"  # written by gpu_check.sh: name, verdict, seconds, exit status (tab-separated)
BANDWIDTH_FILE = "bandwidth.json"


def junit_counts(path: Path) -> dict:
    """Passed / failed / skipped counts and the failing test ids of a pytest junit xml file."""
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failing": []}
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            counts["failing"].append(test_id)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def read_stages(out: Path) -> list:
    stages = []
    path = out / STAGES_FILE
    if not path.exists():
        return stages
    for line in path.read_text().splitlines():
        name, verdict, seconds, rc = line.split("\t")
        stage = {"name": name, "verdict": verdict, "seconds": int(seconds), "rc": int(rc)}
        junit = out / f"junit_{name}.xml"
        if junit.exists():
            try:
                stage["tests"] = junit_counts(junit)
            except ET.ParseError as error:  # a stage killed while pytest wrote it
                stage["tests"] = {"error": f"unreadable junit xml: {error}"}
        stages.append(stage)
    return stages


def read_benchmarks(out: Path) -> dict:
    """Every JSON result a benchmark stage wrote under out (the bench suite's results.json among them)."""
    found = {}
    for path in sorted(out.rglob("*.json")):
        if path.name in ("summary.json", BANDWIDTH_FILE):
            continue
        try:
            found[str(path.relative_to(out))] = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            found[str(path.relative_to(out))] = {"error": f"unreadable: {error}"}
    return found


def measure_bandwidth(out: Path) -> dict:
    """Device-to-device copy bandwidth of a 256 MiB tensor (read + write bytes per second), median of 20 copies."""
    import torch

    if not torch.cuda.is_available():
        result = {"error": "no CUDA device visible"}
    else:
        source = torch.empty(64 * 1024 * 1024, dtype=torch.float32, device="cuda")
        target = torch.empty_like(source)
        for _ in range(3):
            target.copy_(source)
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(source)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        seconds = statistics.median(times)
        result = {"device": torch.cuda.get_device_name(0), "bytes": 2 * source.numel() * source.element_size(),
                  "copy_GBps": round(2 * source.numel() * source.element_size() / seconds / 1e9, 1)}
    (out / BANDWIDTH_FILE).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


def write_summary(out: Path) -> dict:
    bandwidth_path = out / BANDWIDTH_FILE
    summary = {"stages": read_stages(out),
               "bandwidth": json.loads(bandwidth_path.read_text()) if bandwidth_path.exists() else None,
               "benchmarks": read_benchmarks(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="gpu_check.sh's OUT folder")
    parser.add_argument("--bandwidth", action="store_true", help="measure the copy bandwidth into OUT instead")
    args = parser.parse_args()
    if not args.out.is_dir():
        sys.exit(f"gpu_summary: {args.out} is not a folder")
    if args.bandwidth:
        measure_bandwidth(args.out)
        return
    summary = write_summary(args.out)
    for stage in summary["stages"]:
        tests = stage.get("tests", {})
        counts = f" ({tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped)" \
            if "passed" in tests else ""
        print(f"  {stage['name']:22s} {stage['verdict']:10s} {stage['seconds']:4d}s{counts}")
        for test_id in tests.get("failing", [])[:20]:
            print(f"      {test_id}")
    print(f"wrote {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
