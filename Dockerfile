# syntax=docker/dockerfile:1
# Production image: Node 24 runs the TypeScript sources directly (type stripping), so there is no
# build step; the image holds production dependencies only and runs as the unprivileged `node` user.

FROM node:24-bookworm-slim AS deps
WORKDIR /app
COPY package.json package-lock.json ./
# Production dependencies only: no embedded Postgres, no test tools. sharp's prebuilt libvips comes in
# its platform package, so no install scripts are needed.
RUN npm ci --omit=dev --ignore-scripts && npm cache clean --force

FROM node:24-bookworm-slim AS runtime
# Memory (bench, 500 jobs in flight): a 2 MB young generation and two glibc arenas keep a worker
# near 300 MB instead of ~400 MB, for a little more GC work (the npm start scripts pass the same flag).
ENV NODE_ENV=production \
    NODE_OPTIONS=--max-semi-space-size=2 \
    MALLOC_ARENA_MAX=2 \
    PORT=8000 \
    HOST=0.0.0.0 \
    MEDIA_DIR=/app/media \
    RUN_MIGRATIONS=false
WORKDIR /app
COPY --from=deps --chown=node:node /app/node_modules ./node_modules
COPY --chown=node:node package.json openapi.yaml ./
COPY --chown=node:node migrations ./migrations
COPY --chown=node:node src ./src
# The API key CLI: docker compose run --rm api node scripts/keys.ts create --name NAME
COPY --chown=node:node scripts/keys.ts ./scripts/keys.ts
RUN mkdir -p /app/media && chown node:node /app/media
USER node
EXPOSE 8000
VOLUME ["/app/media"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:' + (process.env.PORT || 8000) + '/readyz').then(r => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
# The API by default; the worker and the one-shot migration use the same image (see docker-compose.yml).
CMD ["node", "src/main-api.ts"]
