"""Checking Python layouts against the Linux 6.1 C headers they model.

A generated C program sets each field of each layout to all-ones and prints
the resulting bytes, so every field's offset and width is compared, not only
the sizes.  The headers come from the installed linux-source-6.1 tarball,
extracted once into the pytest cache (see the ``linux_src`` fixture).
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from vdsa_server.device.registers import Layout, field_mask, layout_fields

LINUX_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
LINUX_TOP = "linux-source-6.1"
HEADERS = (
    "drivers/dma/idxd/registers.h",
    "drivers/dma/idxd/idxd.h",
    "include/uapi/linux/idxd.h",
)

DUMP_FUNCTION = """\
static void dump(const char *key, const void *p, size_t n)
{
    const unsigned char *b = p;
    printf("%s|", key);
    while (n--)
        printf("%02x", b[n]);
    printf("\\n");
}
"""


def extract_headers(cache_dir: Path) -> Path:
    """The linux-source tree holding HEADERS, extracted into ``cache_dir`` once.  Test workers
    may ask at once: each extracts into a directory of its own, and the first to finish
    renames it into place."""
    tree = cache_dir / LINUX_TOP
    if not all((tree / h).is_file() for h in HEADERS):
        scratch = Path(tempfile.mkdtemp(dir=cache_dir))
        members = [f"{LINUX_TOP}/{h}" for h in HEADERS]
        subprocess.run(["tar", "-xJf", LINUX_TARBALL, "-C", scratch, *members], check=True)
        try:
            (scratch / LINUX_TOP).rename(tree)
        except OSError:
            # Another worker's, complete; or one an interrupted run left half made.
            if not all((tree / h).is_file() for h in HEADERS):
                shutil.rmtree(tree)
                (scratch / LINUX_TOP).rename(tree)
        shutil.rmtree(scratch, ignore_errors=True)
    return tree


def run_c(prelude: str, include: Path, tmp_path: Path, body: list[str]) -> dict[str, str]:
    """Compile ``body`` as main() after ``prelude``; return its key|value lines."""
    source = tmp_path / "probe.c"
    source.write_text(prelude + DUMP_FUNCTION + "int main(void)\n{\n" + "\n".join(body)
                      + "\nreturn 0;\n}\n")
    binary = tmp_path / "probe"
    subprocess.run(["gcc", "-w", f"-I{include}", source, "-o", binary], check=True)
    output = subprocess.run([binary], check=True, capture_output=True, text=True).stdout
    return dict(line.rsplit("|", 1) for line in output.splitlines())


def c_enumerators(header: str, tag: str) -> dict[str, int]:
    """Enumerators of the C enum ``tag`` in ``header``, with their values."""
    text = re.sub(r"/\*.*?\*/", "", header, flags=re.DOTALL)
    body = re.search(rf"{tag}\s*{{(.*?)}};", text, re.DOTALL)
    assert body is not None, tag
    values: dict[str, int] = {}
    value = -1
    for item in filter(None, (i.strip() for i in body[1].split(","))):
        name, _, explicit = (part.strip() for part in item.partition("="))
        value = int(explicit, 0) if explicit else value + 1
        values[name] = value
    return values


def mask_probe(c_type: str, layout: Layout) -> list[str]:
    """C statements printing sizeof and, per field, the bytes with only that field all-ones."""
    lines = [f'printf("{c_type}|sizeof|%zu\\n", sizeof({c_type}));']
    for field in layout_fields(layout):
        if field.bit_width is None:
            fill = f"memset((void *)&x.{field.path}, 0xff, sizeof(x.{field.path}));"
        else:
            fill = f"x.{field.path} = -1;"
        lines.append(
            f"{{ {c_type} x; memset(&x, 0, sizeof(x)); {fill} "
            f'dump("{c_type}|{field.path}", &x, sizeof(x)); }}'
        )
    return lines


def assert_layouts_match(prelude: str, include: Path, tmp_path: Path,
                         layouts: dict[str, Layout]) -> None:
    body = [line for c_type, layout in layouts.items() for line in mask_probe(c_type, layout)]
    c = run_c(prelude, include, tmp_path, body)
    for c_type, layout in layouts.items():
        assert int(c[f"{c_type}|sizeof"]) == ctypes.sizeof(layout), c_type
        for field in layout_fields(layout):
            c_mask = int(c[f"{c_type}|{field.path}"], 16)
            assert field_mask(layout, field.path) == c_mask, f"{c_type}.{field.path}"
