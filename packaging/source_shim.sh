# Makes `import kimi_desk` work from this source tree without installing it: for a machine with no
# network (the lent GPU machines), where pip cannot fetch the build backend. Usage, from the repo root:
#   source packaging/source_shim.sh
shim=$(mktemp -d)/kimi_desk
mkdir -p "$shim"
cp packaging/kimi_desk/*.py "$shim/"
for part in app engine kernels assets; do ln -s "$PWD/$part" "$shim/$part"; done
ln -s "$PWD/packaging/bench" "$shim/bench"
export PYTHONPATH="$(dirname "$shim")${PYTHONPATH:+:$PYTHONPATH}"
