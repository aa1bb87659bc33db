"""`python -m kiln <command>`: the commands that are not doit tasks.

    python -m kiln import-ansible INVENTORY [--out targets.toml] [--merge] [--group G ...]
                                  [--backend onnxruntime|tensorrt] [--model M ...]
                                  [--install-dir /opt/kiln] [--parser auto|ansible|builtin] [--dry-run]

Exit codes: 0 done, 1 the work said no (the error says why and how to fix it), 2 bad usage.
Importing this module does nothing; the commands import what they need when they run.
"""
from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kiln", description="enginekiln commands that are not doit tasks "
                                     "(the build and deploy commands are: doit list)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    imp = commands.add_parser(
        "import-ansible", help="turn an Ansible inventory into [targets.*] of a fleet file",
        description="Turn an Ansible inventory (INI or YAML; with ansible-core installed, anything Ansible reads) "
                    "into [targets.*] entries of an enginekiln fleet file. An existing file is only ever "
                    "added to (--merge), never replaced.")
    imp.add_argument("inventory", metavar="INVENTORY", help="the Ansible inventory (INI or YAML file)")
    imp.add_argument("--out", default="targets.toml", help="the fleet file to write (default: targets.toml)")
    imp.add_argument("--merge", action="store_true",
                     help="add to an existing fleet file: new hosts are added, existing targets get the inventory's "
                          "connection settings and groups; models, store, defaults and other targets are kept")
    imp.add_argument("--group", action="append", default=[], metavar="G",
                     help="import only the hosts of group G (and of its children); repeatable")
    imp.add_argument("--backend", choices=("onnxruntime", "tensorrt"),
                     help="backend of the imported targets (default: kept for existing targets, onnxruntime for new)")
    imp.add_argument("--model", action="append", default=[], metavar="M",
                     help="model deployed to the imported targets; repeatable. With --merge it must be defined in "
                          "the fleet file (default: every model the file defines)")
    imp.add_argument("--install-dir", help="install_dir of the imported targets (default: kept for existing "
                                           "targets, /opt/kiln for new)")
    imp.add_argument("--parser", choices=("auto", "ansible", "builtin"), default="auto",
                     help="read the inventory with ansible-core, the built-in INI/YAML reader, or ansible-core "
                          "when it is installed (default)")
    imp.add_argument("--dry-run", action="store_true", help="print the fleet file to stdout, write nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from kiln.errors import KilnError
    try:
        if args.command == "import-ansible":
            return _import_ansible(args)
    except KilnError as exc:
        print(f"enginekiln: {exc}", file=sys.stderr)
        return 1
    return 2


def _import_ansible(args) -> int:
    from kiln.ansible_import import import_inventory
    result = import_inventory(args.inventory, args.out, groups=args.group, backend=args.backend,
                              models=args.model, install_dir=args.install_dir, merge=args.merge,
                              parser=args.parser, dry_run=args.dry_run)
    for warning in result.warnings:
        print(f"enginekiln: warning: {warning}", file=sys.stderr)
    if args.dry_run:
        sys.stdout.write(result.text)
    parts = [f"{len(v)} {k} ({', '.join(v)})" for k, v in
             (("added", result.added), ("updated", result.updated), ("unchanged", result.unchanged)) if v]
    verb = "would import" if args.dry_run else "imported"
    print(f"enginekiln: {verb} {len(result.added) + len(result.updated) + len(result.unchanged)} hosts from "
          f"{result.inventory.path} ({result.inventory.parser}) into {result.out}: {'; '.join(parts)}"
          + ("" if args.dry_run or result.written else " (nothing to change)"), file=sys.stderr)
    for note in result.notes:
        print(f"enginekiln: note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
