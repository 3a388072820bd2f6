#!/usr/bin/env bash
# Build mongo-server: FerretDB v1 (embedded, SQLite backend) with twinhub's patches applied.
#
#   tools/mongo-server/build.sh OUTPUT
#
# The FerretDB module is downloaded (and checked against go.sum) as usual, copied to
# build/ferretdb-<version>, patched with patches/*.patch, and used through a `replace` in a
# temporary go.mod (-modfile), so the committed go.mod/go.sum stay those of the upstream module.
# Why each patch exists is written in the patch itself.
set -euo pipefail
out=$(realpath -m "$1")
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
export GOTOOLCHAIN=local CGO_ENABLED=0

module=github.com/FerretDB/FerretDB
version=$(go list -m -f '{{.Version}}' "$module")
upstream=$(go mod download -json "$module@$version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')

work="$here/build"
src="$work/ferretdb-$version"
rm -rf "$src"
mkdir -p "$work"
cp -r "$upstream" "$src"
chmod -R u+w "$src"
for p in "$here"/patches/*.patch; do
  patch --quiet --forward --strip=1 --directory="$src" <"$p"
done

cp go.mod "$work/go.mod"
cp go.sum "$work/go.sum"
go mod edit -modfile="$work/go.mod" -replace="$module=$src"
go build -modfile="$work/go.mod" -buildvcs=false -trimpath -o "$out" .
