#!/usr/bin/env python3
"""Writes control/src/protobuf/schema.txt: the protobuf shape of the Kubernetes objects weft's
API server accepts, so it can read `application/vnd.kubernetes.protobuf` request bodies (kubectl
1.32 sends `create deployment|namespace|configmap|secret|service`, `run` and drain's evictions
that way) into the same JSON every other request is.

Derived from two crates' sources in cargo's registry: k8s-pb (the prost types generated from Kubernetes' generated.proto: message names, field tags
and wire types) and k8s-openapi (the JSON field names, which prost's snake_case names lose:
`podIPs` becomes `pod_i_ps`). Only the messages reachable from the served kinds (from
control/src/resources.rs) are written.

Format, one record per line:
  M <message>                      a message, named by its k8s-pb module path (api.core.v1.Pod)
  F <tag> <json> <kind> <card> [<message>]
      json: the JSON name, or ~ for a struct embedded inline (its fields are the parent's)
      kind: string int32 int64 bool double bytes message map:string:<value kind>
      card: one | many
Run: python3 scripts/gen-proto-schema.py  (after cargo fetch)
"""

import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def crate_dir(name):
    """The crate's source in cargo's registry: the version in Cargo.lock, else the newest
    downloaded (k8s-pb is only read here, not built: `cargo download`/`cargo fetch` it once)."""
    home = os.environ.get("CARGO_HOME", os.path.expanduser("~/.cargo"))
    lock = open(os.path.join(ROOT, "Cargo.lock")).read()
    m = re.search(r'name = "%s"\nversion = "([^"]+)"' % re.escape(name), lock)
    pattern = f"{name}-{m.group(1)}" if m else f"{name}-[0-9]*"
    found = sorted(glob.glob(os.path.join(home, "registry/src/*", pattern)))
    if not found:
        sys.exit(f"{name} is not in cargo's registry")
    return found[-1]


PB = crate_dir("k8s-pb")
OPENAPI = crate_dir("k8s-openapi")
# The newest Kubernetes version k8s-openapi carries: k8s-pb may know fields newer than the
# version weft serves, and each needs its JSON name.
VERSION = sorted(
    (d for d in os.listdir(os.path.join(OPENAPI, "src")) if d.startswith("v1_")),
    key=lambda d: int(d.split("_")[1]),
)[-1]

FIELD = re.compile(
    r'#\[prost\(([^\]]*?)tag = "(\d+)"\)\]\s*(?:#\[[^\]]*\]\s*)*pub (r#)?(\w+):\s*([\s\S]*?),\n(?=\s*(?:///|#\[|\}|$))'
)
STRUCT = re.compile(r"pub struct (\w+) \{(.*?)\n\}", re.S)


def module_of(path):
    rel = os.path.relpath(os.path.dirname(path), os.path.join(PB, "src"))
    return rel.replace(os.sep, ".")


def resolve(module, rust_type):
    """The message a field's Rust type names, as a module path."""
    # rustfmt leaves a trailing comma inside a wrapped generic: `Vec<\n    T,\n>`.
    t = rust_type.replace(",>", ">").rstrip(",")
    for wrap in ("::core::option::Option<", "::prost::alloc::vec::Vec<",
                 "::prost::alloc::boxed::Box<", "Option<", "Vec<", "Box<"):
        while t.startswith(wrap):
            t = t[len(wrap):-1]
    if "BTreeMap<" in t:
        t = t.split(",", 1)[1].strip().rstrip(">,").strip()
    parts = t.split("::")
    mod = module.split(".")
    out = []
    for p in parts[:-1]:
        if p == "super":
            mod = mod[:-1]
        elif p:
            out.append(p)
    return ".".join(mod + out + [parts[-1]])


messages = {}
for path in glob.glob(os.path.join(PB, "src/**/mod.rs"), recursive=True):
    module = module_of(path)
    text = open(path).read()
    for sm in STRUCT.finditer(text):
        name, body = sm.group(1), sm.group(2) + "\n}"
        fields = []
        for fm in FIELD.finditer(body):
            attrs, tag, rust_name = fm.group(1), int(fm.group(2)), fm.group(4)
            rust_type = re.sub(r"\s+", "", fm.group(5))
            card = "many" if "repeated" in attrs else "one"
            ref = None
            if attrs.startswith("btree_map") or attrs.startswith("map"):
                value = re.search(r'map = "string, (\w+)"', attrs).group(1)
                kind = "map:string:" + value
                card = "one"
                if value == "message":
                    ref = resolve(module, rust_type)
            else:
                kind = attrs.split(",")[0].split("=")[0].strip()
                if kind == "message":
                    ref = resolve(module, rust_type)
            fields.append((tag, rust_name, kind, card, ref))
        messages[f"{module}.{name}"] = fields


def snake(name):
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def json_names(message):
    """JSON names of a message's fields from k8s-openapi, keyed by the name without case or _."""
    parts = message.split(".")
    if parts[0] == "api":
        rel = os.path.join(*parts[1:-1])
        f = os.path.join(OPENAPI, "src", VERSION, "api", rel, snake(parts[-1]) + ".rs")
    elif parts[0] == "apimachinery":
        f = os.path.join(OPENAPI, "src", VERSION, "apimachinery", *parts[1:-1], snake(parts[-1]) + ".rs")
    else:
        return {}
    if not os.path.exists(f):
        return {}
    names = {}
    for m in re.finditer(r'"(\w+)" => Field::Key_(\w+),', open(f).read()):
        names[m.group(2).replace("_", "").lower()] = m.group(1)
    return names


def camel(rust):
    head, *rest = rust.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


text = open(os.path.join(ROOT, "control/src/resources.rs")).read()
roots = []
for m in re.finditer(r'resource!\(\s*"([^"]*)",\s*"([^"]+)",\s*"[^"]+",\s*"[^"]+",\s*"(\w+)"', text):
    group, version, kind = m.groups()
    g = "core" if group == "" else group.split(".")[0]
    roots.append(f"api.{g}.{version}.{kind}")
roots += [
    "api.core.v1.Binding",
    "api.policy.v1.Eviction",
    "api.autoscaling.v1.Scale",
    "apimachinery.pkg.apis.meta.v1.DeleteOptions",
    # kubectl auth whoami and kubectl auth can-i.
    "api.authentication.v1.SelfSubjectReview",
    "api.authorization.v1.SelfSubjectAccessReview",
    "apimachinery.pkg.runtime.Unknown",
]

# Messages read specially (their JSON is not an object of their fields) need no fields.
SPECIAL = {
    "apimachinery.pkg.apis.meta.v1.Time", "apimachinery.pkg.apis.meta.v1.MicroTime",
    "apimachinery.pkg.apis.meta.v1.Duration", "apimachinery.pkg.util.intstr.IntOrString",
    "api.resource.Quantity", "apimachinery.pkg.api.resource.Quantity",
    "apimachinery.pkg.runtime.RawExtension", "apimachinery.pkg.apis.meta.v1.FieldsV1",
}

seen, order, todo = set(), [], [r for r in roots if r in messages]
missing = [r for r in roots if r not in messages]
if missing:
    sys.exit(f"no k8s-pb message for {missing}")
while todo:
    m = todo.pop()
    if m in seen:
        continue
    seen.add(m)
    order.append(m)
    if m in SPECIAL:
        continue
    for (_, _, _, _, ref) in messages[m]:
        if ref and ref not in seen:
            if ref not in messages:
                sys.exit(f"{m} refers to {ref}, which k8s-pb does not define")
            todo.append(ref)

out = [
    "# Generated by scripts/gen-proto-schema.py from k8s-pb and k8s-openapi; do not edit.",
]
for m in sorted(order):
    out.append(f"M {m}")
    if m in SPECIAL:
        continue
    names = json_names(m)
    for (tag, rust, kind, card, ref) in messages[m]:
        json = names.get(rust.replace("_", "").lower())
        embedded = ref and (snake(ref.rsplit(".", 1)[1]) == rust or ref.endswith("Handler"))
        if json is None and names and kind == "message" and card == "one" and embedded:
            # A Go struct embedded inline (Volume's VolumeSource, Probe's ProbeHandler): its
            # fields are the parent's in JSON.
            json = "~"
        elif json is None:
            json = camel(rust)
        out.append(" ".join(str(x) for x in ["F", tag, json, kind, card] + ([ref] if ref else [])))
dest = os.path.join(ROOT, "control/src/protobuf/schema.txt")
os.makedirs(os.path.dirname(dest), exist_ok=True)
open(dest, "w").write("\n".join(out) + "\n")
print(f"{dest}: {len(order)} messages, {sum(1 for l in out if l.startswith('F'))} fields")
