#!/usr/bin/env python3
"""List vmmu's public API: every item reachable from the crate root, one per line.

    RUSTC_BOOTSTRAP=1 cargo rustdoc -p vmmu --lib [--features internals] \
        -- -Zunstable-options --output-format json
    .ci/public-api.py target/doc/vmmu.json

Modules, types, traits, functions and constants by every path they are reachable at;
fields, variants and inherent methods once, under the item's first (shortest) path.
Trait implementations are left out (they follow from the types and traits listed).
"""
import json
import sys
from collections import deque


def main(path):
    d = json.load(open(path))
    index = d["index"]
    root = index[str(d["root"])]

    def item(i):
        return index.get(str(i))

    def kind(it):
        return next(iter(it["inner"]))

    lines = set()
    seen = set()
    queue = deque([(root, root["name"])])
    while queue:
        it, p = queue.popleft()
        k = kind(it)
        inner = it["inner"][k]
        if k == "module":
            lines.add(f"mod {p}")
            for c in inner["items"]:
                ci = item(c)
                if ci is None:
                    continue
                if kind(ci) == "use":
                    u = ci["inner"]["use"]
                    target = item(u["id"]) if u["id"] is not None else None
                    if target is None:
                        continue
                    if u["is_glob"]:
                        queue.append((target, p))
                    else:
                        queue.append((target, f"{p}::{u['name']}"))
                elif ci.get("name"):
                    queue.append((ci, f"{p}::{ci['name']}"))
            continue
        if k in ("impl", "struct_field", "variant"):
            continue
        unsafe = ""
        if k == "function" and inner["header"]["is_unsafe"]:
            unsafe = "unsafe "
        lines.add(f"{unsafe}{k.replace('_', ' ')} {p}")
        if it["id"] in seen:
            continue
        seen.add(it["id"])
        impls = []
        if k == "struct":
            sk = inner["kind"]
            if "plain" in sk:
                for f in sk["plain"]["fields"]:
                    lines.add(f"  field {p}.{item(f)['name']}")
            elif "tuple" in sk:
                for n, f in enumerate(sk["tuple"]):
                    if f is not None:
                        lines.add(f"  field {p}.{n}")
            impls = inner["impls"]
        elif k == "enum":
            for v in inner["variants"]:
                lines.add(f"  variant {p}::{item(v)['name']}")
            impls = inner["impls"]
        elif k == "union":
            impls = inner["impls"]
        elif k == "trait":
            for m in inner["items"]:
                mi = item(m)
                lines.add(f"  trait item {p}::{mi['name']}")
        for im in impls:
            ii = item(im)
            if ii is None:
                continue
            imp = ii["inner"]["impl"]
            if imp["trait"] is not None or imp.get("is_synthetic") or imp.get("blanket_impl"):
                continue
            for m in imp["items"]:
                mi = item(m)
                if mi is None or mi.get("visibility") != "public":
                    continue
                mk = kind(mi)
                unsafe = ""
                if mk == "function" and mi["inner"]["function"]["header"]["is_unsafe"]:
                    unsafe = "unsafe "
                lines.add(f"  {unsafe}{mk.replace('_', ' ')} {p}::{mi['name']}")
    # Keep members right after their item: sort by path, members after the item line.
    def key(line):
        s = line.strip()
        name = s.split(" ")[-1]
        return (name.replace(".", "::"), line.startswith("  "))

    for line in sorted(lines, key=key):
        print(line)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "target/doc/vmmu.json")
