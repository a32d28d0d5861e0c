# One image for every role; docker-compose.yml picks the command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY broker ./broker
COPY device ./device
COPY publisher ./publisher
RUN pip install --no-cache-dir ".[all]"
COPY docker/ ./docker/
ENV FLEETBUS_REGISTRY=/data/registry.json
VOLUME ["/data"]
ENTRYPOINT ["fleetbus"]
