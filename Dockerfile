# One image for every Ingot process; compose picks the command (ingot api|worker|beat|flower).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml requirements.lock README.md ./
COPY pipelines ./pipelines
COPY worker ./worker
COPY api ./api
RUN pip install -c requirements.lock . && useradd --create-home ingot
COPY sources.toml ./
COPY data ./data
USER ingot
EXPOSE 8000 5555
CMD ["ingot", "api"]
