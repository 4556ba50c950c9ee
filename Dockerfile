# invoice-watch container image.
#
#   docker build -t invoice-watch .
#   docker run -d --name invoice-watch --stop-timeout 15 \
#     -v "$PWD/config.yaml:/etc/invoice-watch/config.yaml:ro" \
#     -v "$PWD/secrets:/run/secrets:ro" \
#     -v invoice-watch-state:/var/lib/invoice-watch \
#     invoice-watch
#
# (secrets/: one file per secret, mode 0400, owned by uid 10001; see README.md.)
# See docker-compose.example.yml for Compose secrets, restart policy and the stop timeout.

# --- Build stage: install the project and its dependencies into a virtualenv -----------
FROM python:3.11-slim AS build

RUN python -m venv /opt/invoice-watch
WORKDIR /src
COPY pyproject.toml README.md ./
COPY invoice_watch ./invoice_watch
RUN /opt/invoice-watch/bin/pip install --no-cache-dir .

# --- Runtime stage: the virtualenv only, no source tree or build tools -----------------
FROM python:3.11-slim

COPY --from=build /opt/invoice-watch /opt/invoice-watch

# A fixed non-root uid/gid, so volume and secret file ownership is predictable.
RUN groupadd --system --gid 10001 invoice-watch \
    && useradd --system --uid 10001 --gid invoice-watch --no-create-home \
        --home-dir /var/lib/invoice-watch --shell /usr/sbin/nologin invoice-watch \
    && install -d -m 0755 /etc/invoice-watch \
    && install -d -m 0700 -o invoice-watch -g invoice-watch /var/lib/invoice-watch

# The config is mounted read-only at $INVOICE_WATCH_CONFIG; the SQLite state lives in
# $STATE_DIRECTORY (state.db), which is a volume so it survives the container. The config
# names it too (`state: {path: /var/lib/invoice-watch/state.db}`, as under systemd).
# matplotlib (report charts) keeps its font cache on the volume too: built once, not at
# every start, and no warning that $HOME (none) is not writable.
# SQLite's temporary files (a big organization's first listing staged until its commit:
# about 160 bytes an invoice, README Guarantees) go on the volume too, not in the tmpfs
# /tmp of a read-only container, which is memory.
ENV PATH=/opt/invoice-watch/bin:$PATH \
    STATE_DIRECTORY=/var/lib/invoice-watch \
    SQLITE_TMPDIR=/var/lib/invoice-watch \
    MPLCONFIGDIR=/var/lib/invoice-watch/matplotlib-cache \
    INVOICE_WATCH_CONFIG=/etc/invoice-watch/config.yaml \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
VOLUME /var/lib/invoice-watch

# Secrets: files under /run/secrets/<name> (Compose secrets, or a folder mounted read-only
# there), named by the config's `<field>_file` keys, e.g.
#   atlas.auth.private_key_file: /run/secrets/atlas-private-key
#   notifiers.<slack>.webhook_url_file: /run/secrets/slack-webhook-url
# Never pass secrets as ENV (`docker run -e`) or build args: both are visible in
# `docker inspect`.

USER 10001:10001
WORKDIR /var/lib/invoice-watch

# Healthy while the last poll cycle finished recently and read at least one organization,
# or the cycle running makes progress (the daemon records it in the state file): the same
# judgement as /healthz. The first cycle may retry for a few minutes, hence the start period.
HEALTHCHECK --interval=60s --timeout=30s --start-period=5m --retries=3 \
    CMD ["invoice-watch", "status", "--check"]

# SIGTERM (docker stop) finishes or rolls back the cycle in flight; the daemon exits within
# 10 s, so give it a stop timeout above 10 s (compose: stop_grace_period).
ENTRYPOINT ["invoice-watch"]
CMD ["run"]
