"""Host-side helper of build-python, run by the freshly built (staged) interpreter on the target host.

Uploaded next to the source tarball and executed as `<staged>/bin/python3 pybuild.py CMD ...`, so it
must run on every Python build-python can produce (3.7+) with the stdlib only. It prints one JSON object.

  check MODULE...                 import each module; report version, sys.prefix, which libpython got mapped
  swap PREFIX STAGED OLD MODE     move the staged tree into PREFIX, the previous install into OLD (journaled)
  rollback OLD                    undo a swap from OLD/journal.json (used when the post-swap check fails)

Why a journal of renames instead of one rename: when PREFIX is itself a mount point (a dedicated volume, or
a test host's private mount), it cannot be renamed, so its entries are swapped one by one ("entries" mode).
Otherwise PREFIX is renamed aside whole and the staged tree renamed in ("whole" mode). Either way every move
is a rename(2) on one filesystem, and the journal records each completed move so `rollback` restores exactly
what was there.
"""

import importlib
import json
import os
import sys

JOURNAL = "journal.json"


def _emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")


def check(modules):
    results = {}
    for name in modules:
        try:
            importlib.import_module(name)
            results[name] = ""
        except Exception as exc:  # any import failure is a finding, not a crash of the checker
            results[name] = f"{type(exc).__name__}: {exc}"
    libpython = ""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if "libpython" in line:
                    libpython = line.split()[-1]
                    break
    except OSError:
        pass
    _emit(
        {
            "version": ".".join(str(n) for n in sys.version_info[:3]),
            "prefix": sys.prefix,
            "executable": sys.executable,
            "libpython": libpython,
            "modules": results,
        }
    )


def _write_journal(old, state, moves):
    tmp = os.path.join(old, JOURNAL + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"state": state, "moves": moves}, f)
    os.rename(tmp, os.path.join(old, JOURNAL))


def _planned_moves(prefix, staged, old, mode):
    if mode == "whole":
        moves = []
        if os.path.lexists(prefix):
            moves.append([prefix, os.path.join(old, "prefix")])
        moves.append([staged, prefix])
        return moves
    if mode != "entries":
        raise SystemExit(f"unknown swap mode {mode!r}")
    ours = (".sockops-stage.", ".sockops-old.")
    moves = [
        [os.path.join(prefix, e), os.path.join(old, e)]
        for e in sorted(os.listdir(prefix))
        if not e.startswith(ours)
    ]
    moves += [[os.path.join(staged, e), os.path.join(prefix, e)] for e in sorted(os.listdir(staged))]
    return moves


def swap(prefix, staged, old, mode):
    os.mkdir(old)  # fails if it exists: never mix two swaps' journals
    done = []
    _write_journal(old, "swapping", done)
    try:
        for src, dst in _planned_moves(prefix, staged, old, mode):
            os.rename(src, dst)
            done.append([src, dst])
            _write_journal(old, "swapping", done)
    except OSError as exc:
        _undo(done)
        _write_journal(old, "rolled-back", [])
        _emit({"ok": False, "error": f"{exc} (rolled back {len(done)} moves)"})
        return 1
    _write_journal(old, "swapped", done)
    _emit({"ok": True, "moves": len(done)})
    return 0


def _undo(done):
    for src, dst in reversed(done):
        os.rename(dst, src)


def rollback(old):
    with open(os.path.join(old, JOURNAL)) as f:
        journal = json.load(f)
    _undo(journal["moves"])
    _write_journal(old, "rolled-back", [])
    _emit({"ok": True, "moves": len(journal["moves"])})
    return 0


def main(argv):
    cmd, args = argv[0], argv[1:]
    if cmd == "check":
        check(args)
        return 0
    if cmd == "swap":
        return swap(*args)
    if cmd == "rollback":
        return rollback(*args)
    raise SystemExit("usage: pybuild.py check|swap|rollback ...")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
