"""Break the code on purpose, one behaviour at a time, and see the test that claims to prove it fail.

Each break in `scripts/breaks.json` names a file under the checkout, a piece of its text (found exactly once), what to
put in its place, and the tests that must then fail. For each: the file is changed, the tests run alone
(`python -m pytest -x`), the file is put back whatever happens, and one JSON line says whether they failed, their
first `E` line and how long they took. tests/EVIDENCE.md lists the results; run a break again when its claim moves to
another test.

    python scripts/break_on_purpose.py                 # every break (about 25 minutes on 2 cores)
    python scripts/break_on_purpose.py M12 M13         # those whose id starts with M12 or M13
    python scripts/break_on_purpose.py --list

Run it on a clean checkout and edit nothing while it runs: the break is in the working tree until its tests end.
A break whose tests pass (exit 0) is reported as `"failed": false`, and the script exits 1: its claim is not proven.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BREAKS = Path(__file__).with_name("breaks.json")


def run_break(b: dict, timeout: float) -> dict:
    path = ROOT / b["file"]
    original = path.read_text()
    if original.count(b["old"]) != 1:
        return {"id": b["id"], "failed": None, "error": f"the text to break is not found exactly once in {b['file']}"}
    t0 = time.monotonic()
    path.write_text(original.replace(b["old"], b["new"]))
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x", *b["tests"]],
                           cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out, code = r.stdout, r.returncode
    except subprocess.TimeoutExpired as e:
        out, code = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), -1
        out += f"\ntimed out after {timeout:.0f} s"
    finally:
        path.write_text(original)
    first_e = next((line for line in out.splitlines() if line.startswith("E ")), "")
    lines = out.strip().splitlines()
    return {"id": b["id"], "failed": code != 0, "summary": lines[-1] if lines else "", "first_E": first_e[:300],
            "seconds": round(time.monotonic() - t0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ids", nargs="*", help="run only the breaks whose id starts with one of these")
    parser.add_argument("--list", action="store_true", help="list the breaks and their tests, run nothing")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per break's tests (default 1800)")
    args = parser.parse_args()
    breaks = [b for b in json.loads(BREAKS.read_text()) if not args.ids or b["id"].startswith(tuple(args.ids))]
    if args.list:
        for b in breaks:
            print(f"{b['id']}: {b['file']} -> {' '.join(b['tests'])}")
        return 0
    proven = True
    for b in breaks:
        result = run_break(b, args.timeout)
        print(json.dumps(result), flush=True)
        proven &= bool(result["failed"])
    return 0 if proven else 1


if __name__ == "__main__":
    sys.exit(main())
