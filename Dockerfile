# cueline: gRPC on 50051, REST on 8080, SQLite in /var/lib/cueline unless
# CUELINE_DATABASE_URL points at PostgreSQL.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY clients ./clients
RUN pip install --no-cache-dir --upgrade pip \
 && pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/cueline --create-home cueline
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER cueline
ENV CUELINE_HOST=0.0.0.0 \
    CUELINE_DATA_DIR=/var/lib/cueline \
    CUELINE_SHUTDOWN_DRAIN_SECONDS=5 \
    PYTHONUNBUFFERED=1
VOLUME ["/var/lib/cueline"]
EXPOSE 50051 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["cueline"]
CMD ["serve"]
