"""Rebuild a Ray wheel smaller: drop the parts core Ray actors never use, keep RECORD consistent.

    python tools/slim_ray_wheel.py ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl OUTDIR --strip-symbols

For a GPU machine with no network and a limit on what travels to it (bench/gpu.py's docstring):
Ray 2.60's wheel is 79 MB, this one 35 MB. What `bench/gpu.py` needs of Ray (ray.init without
the dashboard, actors, placement groups) stays; the Java jar, the dashboard's web client, RLlib,
Tune, Train, Data, AIR, LLM and Serve go (Serve needs FastAPI and pydantic besides).

The output keeps the input's file name. Deleted files lose their RECORD lines; changed files
(entry_points.txt, and with --strip-symbols the ELF binaries, whose symbol tables go: a C++
crash's stack loses its function names) get new hashes and sizes.
"""

import base64
import csv
import hashlib
import io
import os
import re
import subprocess
import sys
import tempfile
import zipfile

DROP_PREFIXES = (
    "ray/jars/",  # Java worker jar (ray_dist.jar)
    "ray/dashboard/client/build/",  # dashboard web UI (include_dashboard=False)
    "ray/rllib/",
    "ray/tune/",
    "ray/train/",
    "ray/data/",
    "ray/llm/",
    "ray/air/",  # used only by tune/train/data
    "ray/serve/",  # needs fastapi, starlette, pydantic: none on the GPU machine
)
DROP_SUFFIXES = (".js.map",)
DROP_CONSOLE_SCRIPTS = ("tune", "serve")  # their modules are gone
ELF_TO_STRIP = (
    "ray/_raylet.so",
    "ray/core/src/ray/gcs/gcs_server",
    "ray/core/src/ray/raylet/raylet",
    "ray/core/libjemalloc.so",
)


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def dropped(name: str) -> bool:
    return name.startswith(DROP_PREFIXES) or name.endswith(DROP_SUFFIXES)


def strip_elf(data: bytes) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in"), os.path.join(tmp, "out")
        with open(src, "wb") as f:
            f.write(data)
        subprocess.run(["strip", "--strip-unneeded", "-o", dst, src], check=True)
        with open(dst, "rb") as f:
            return f.read()


def main() -> None:
    src, outdir = sys.argv[1], sys.argv[2]
    strip_symbols = "--strip-symbols" in sys.argv[3:]
    out = os.path.join(outdir, os.path.basename(src))
    zin = zipfile.ZipFile(src)
    record_name = next(n for n in zin.namelist() if re.fullmatch(r"[^/]+\.dist-info/RECORD", n))
    old_record = list(csv.reader(io.StringIO(zin.read(record_name).decode())))
    kept, changed, n_dropped, bytes_dropped = [], {}, 0, 0
    for info in zin.infolist():
        if dropped(info.filename):
            n_dropped += 1
            bytes_dropped += info.compress_size
            continue
        kept.append(info)
        if info.filename == record_name.replace("RECORD", "entry_points.txt"):
            lines = zin.read(info).decode().splitlines(keepends=True)
            lines = [line for line in lines if line.split("=")[0].strip() not in DROP_CONSOLE_SCRIPTS]
            changed[info.filename] = "".join(lines).encode()
        elif strip_symbols and info.filename in ELF_TO_STRIP:
            changed[info.filename] = strip_elf(zin.read(info))
    rows = []
    for row in old_record:
        if not row:
            continue
        name = row[0]
        if dropped(name):
            continue
        if name == record_name:
            rows.append([name, "", ""])
        elif name in changed:
            rows.append([name, record_hash(changed[name]), str(len(changed[name]))])
        else:
            rows.append(row)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    changed[record_name] = buf.getvalue().encode()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for info in kept:
            data = changed.get(info.filename)
            if data is None:
                data = zin.read(info)
            zi = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            zi.external_attr = info.external_attr  # keep the executable bits
            zi.create_system = info.create_system
            zi.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(zi, data, compresslevel=9)
    # RECORD must list every file left, and nothing else
    names = {i.filename for i in kept}
    listed = {r[0] for r in rows}
    assert names == listed, (sorted(names - listed)[:10], sorted(listed - names)[:10])
    print(
        f"dropped {n_dropped} files ({bytes_dropped / 2**20:.1f} MiB compressed); "
        f"changed {sorted(changed)}; wrote {out} {os.path.getsize(out) / 2**20:.2f} MiB"
    )


if __name__ == "__main__":
    main()
