#!/usr/bin/env bash
# Rebuilds the GraphiQL assets served by GET /graphql (so the page works offline, with
# nothing from a CDN): fetches the pinned packages from the npm registry, minifies
# GraphiQL's UMD bundle (its graphiql.min.js ships unminified) and gzips everything.
# The server sends the .gz files as they are, with Content-Encoding: gzip.
set -euo pipefail
GRAPHIQL=3.8.3 REACT=18.3.1 ESBUILD=0.24.0
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent "graphiql@$GRAPHIQL" "react@$REACT" "react-dom@$REACT" >/dev/null
npm install --no-save --silent "esbuild@$ESBUILD" >/dev/null
for p in graphiql-$GRAPHIQL react-$REACT react-dom-$REACT; do
  mkdir "$p" && tar xzf "$p.tgz" -C "$p"
done
node_modules/.bin/esbuild --minify --log-level=error \
  "graphiql-$GRAPHIQL/package/graphiql.min.js" --outfile=graphiql.js
node_modules/.bin/esbuild --minify --log-level=error \
  "graphiql-$GRAPHIQL/package/graphiql.min.css" --outfile=graphiql.css
cp "react-$REACT/package/umd/react.production.min.js" react.js
cp "react-dom-$REACT/package/umd/react-dom.production.min.js" react-dom.js
for f in graphiql.js graphiql.css react.js react-dom.js; do
  gzip -9 -n -c "$f" >"$here/$f.gz"
done
cp "graphiql-$GRAPHIQL/package/LICENSE" "$here/LICENSE-graphiql"
cp "react-$REACT/package/LICENSE" "$here/LICENSE-react"
