# Makes `import kimi_desk` work from this source tree without installing it: for a machine with no
# network (the lent GPU machines), where pip cannot fetch the build backend. Usage, from the repo root:
#   source packaging/source_shim.sh
# Wheels in .whl/ (runtime dependencies the machine lacks, such as platformdirs; fla-core for the
# references) are unpacked beside it and put on the path too.
shim=$(mktemp -d)/kimi_desk
mkdir -p "$shim"
cp packaging/kimi_desk/*.py "$shim/"
for part in app engine kernels assets; do ln -s "$PWD/$part" "$shim/$part"; done
ln -s "$PWD/packaging/bench" "$shim/bench"
if compgen -G ".whl/*.whl" > /dev/null; then
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --target "$(dirname "$shim")/wheels" .whl/*.whl
  export PYTHONPATH="$(dirname "$shim")/wheels${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$(dirname "$shim")${PYTHONPATH:+:$PYTHONPATH}"
