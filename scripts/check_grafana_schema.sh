#!/usr/bin/env bash
# Type-checks compose/grafana/dashboards/inferplane.json against Grafana's dashboard schema as Grafana publishes it
# (the `Dashboard` type of the npm package @grafana/schema, generated from Grafana's CUE schema) with TypeScript:
# an unknown field or a wrong type fails. Needs node and npm (the npm registry); not part of `make test`.
#   bash scripts/check_grafana_schema.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
echo '{"private": true}' > package.json
npm install --silent --no-audit --no-fund @grafana/schema@13.2.3 typescript@5 >/dev/null
{
  echo 'import type { Dashboard } from "@grafana/schema";'
  echo -n 'const dashboard: Dashboard = '
  cat "$root/compose/grafana/dashboards/inferplane.json"
  echo ';'
  echo 'export default dashboard;'
} > check.ts
npx tsc --noEmit --strict --moduleResolution bundler --module esnext --target es2022 --skipLibCheck check.ts
echo "compose/grafana/dashboards/inferplane.json fits @grafana/schema 13.2.3's Dashboard"
