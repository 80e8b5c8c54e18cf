"""Checks of a store's files that readers and the writer share: is this folder a tcsmae
store of a version we read, are its group files intact, do its chunks carry checksums."""

from __future__ import annotations

from pathlib import Path

from tcsmae.errors import UserError
from tcsmae.store.format import FORMAT, FORMAT_VERSION, GROUP_FILE
from tcsmae.store.shard_reader import missing_shard_is_damage


def chunks_checksummed(folder: Path) -> bool:
    """Whether the array in `folder` has the checksummed format's chunk chain (ending in crc32c),
    in which a missing image chunk or shard file is damage (shard_reader.missing_shard_is_damage)."""
    import json

    try:
        return missing_shard_is_damage(json.loads((folder / "zarr.json").read_text()))
    except (OSError, ValueError):
        return False


def check_store_group(path: Path, output: bool = False) -> None:
    """Refuse a folder that is not a tcsmae store. output: the folder is a conversion's -o (the
    fix is then another folder, not `tcsmae convert`)."""
    import json

    meta = path / "zarr.json"
    other = "; choose a new or empty folder for -o" if output else ""
    if not meta.is_file():
        raise UserError(f"{path} is not a Zarr store (no zarr.json)"
                        + (other or "; create one with `tcsmae convert ... -o STORE`"))
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (ValueError, AttributeError) as exc:
        raise UserError(f"{meta} is not valid JSON ({exc}); the store is damaged"
                        + (other or "; convert into a new store")) from exc
    if attrs.get("format") != FORMAT:
        raise UserError(f"{path} is a Zarr group but not a tcsmae CT store "
                        f"(format={attrs.get('format')!r}){other}")
    if int(attrs.get("format_version", 0)) > FORMAT_VERSION:
        raise UserError(
            f"{path} has format_version {attrs.get('format_version')}, newer than this tcsmae "
            f"reads ({FORMAT_VERSION}); upgrade tcsmae"
        )


def broken_group_files(path: Path) -> list[str]:
    """One message per damaged group file of a store (images/zarr.json, labels/zarr.json:
    missing while its folder exists, not JSON, or not a group), naming the file and the fix.
    Opening an array does not read them, but zarr does when a writer adds a case."""
    import json

    problems = []
    for name in ("images", "labels"):
        meta = path / name / "zarr.json"
        if not meta.parent.is_dir():
            continue
        try:
            node = json.loads(meta.read_text())
            why = None if isinstance(node, dict) and node.get("node_type") == "group" else "not a Zarr group"
        except (OSError, ValueError) as exc:
            why = f"{type(exc).__name__}: {exc}"
        if why is not None:
            problems.append(f"{meta} is unreadable ({why}). It is the group file of the store's {name} and "
                            f"holds no data: fix it by writing {GROUP_FILE} into it (the arrays under "
                            f"{meta.parent} are not affected)")
    return problems
