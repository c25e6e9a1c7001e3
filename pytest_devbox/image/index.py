"""The virt-builder index format: one parser and one formatter for every index we read.

Our local template repository writes its ``index`` with :func:`format_index`; the
image cache reads both that index and the public (PGP clearsigned) one with
:func:`parse_sections`, to find the revisions of a template.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Section = tuple[str, dict[str, str]]


def parse_sections(text: str) -> list[Section]:
    """Parse a virt-builder index into its ``[name]`` sections of ``key=value`` lines, in order.

    A name may repeat (the public index has one section per arch). A line starting with
    a space continues the previous value (multi-line ``notes``). A PGP clearsigned index
    (the public one) is unwrapped first. Raises ValueError on a line that is neither.
    """
    lines = text.splitlines()
    if lines and lines[0].startswith("-----BEGIN PGP SIGNED MESSAGE"):
        body_start = lines.index("") + 1 if "" in lines else 1
        end = next(
            (i for i, ln in enumerate(lines) if ln.startswith("-----BEGIN PGP SIGNATURE")),
            len(lines),
        )
        # RFC 4880 dash-escaping: a signed line that starts with '-' gets "- " in front.
        lines = [ln[2:] if ln.startswith("- ") else ln for ln in lines[body_start:end]]
    sections: list[Section] = []
    current: dict[str, str] | None = None
    last_key: str | None = None
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            last_key = None
            continue
        if line.startswith(" ") and current is not None and last_key is not None:
            current[last_key] += "\n" + line[1:]
            continue
        if line.startswith("[") and line.rstrip().endswith("]"):
            current = {}
            sections.append((line.strip()[1:-1], current))
            last_key = None
            continue
        key, sep, value = line.partition("=")
        if not sep or current is None:
            raise ValueError(
                f"line {lineno} of the index is not 'key=value' in a section: {line!r}"
            )
        current[key] = value
        last_key = key
    return sections


def sections_by_name(text: str) -> dict[str, dict[str, str]]:
    """Our own index: one section per template (x86_64 only), by name."""
    by_name: dict[str, dict[str, str]] = {}
    for name, fields in parse_sections(text):
        by_name.setdefault(name, {}).update(fields)
    return by_name


def format_index(sections: Mapping[str, Mapping[str, str]]) -> str:
    """Write sections back in the virt-builder index format, sorted by name."""
    chunks = []
    for name in sorted(sections):
        lines = [f"[{name}]"]
        for key, value in sections[name].items():
            lines.append(f"{key}=" + value.replace("\n", "\n "))
        chunks.append("\n".join(lines) + "\n")
    return "\n".join(chunks)


def revisions(sections: Sequence[Section], template: str, uri: str) -> list[list[str]]:
    """Every ``[uri, arch, revision, checksum]`` the index offers for ``template``.

    This is what pins a template in an image's cache key: a new revision (or a
    rebuilt template with a new checksum) makes a new key.
    """
    return [
        [
            uri,
            fields.get("arch", ""),
            fields.get("revision", "1"),
            fields.get("checksum[sha512]", fields.get("checksum", "")),
        ]
        for name, fields in sections
        if name == template
    ]
