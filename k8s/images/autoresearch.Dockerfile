# The controller and trial image: the controller Job runs `autoresearch run STUDY`, every trial
# attempt is a Job running `autoresearch trial ...`, and optuna-dashboard runs from it too.
# No torch: trials train through the shared training API (trainer-api.Dockerfile).
# Build from the repository root:
#   docker build -f k8s/images/autoresearch.Dockerfile -t IMAGE .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed non-root uid, so the manifests can say runAsUser: 10001. Its home holds the
# Hugging Face cache (trials load the base model's tokenizer).
RUN useradd --create-home --uid 10001 --user-group app

WORKDIR /app
COPY . /app
# Study files name their run folder relative to themselves (studies/runs/<name>): the one
# folder the app user writes under /app. The gcs extra: the GCS artifact store of the gke study.
RUN pip install --no-cache-dir '.[gcs]' \
    && mkdir -p /app/studies/runs \
    && chown app:app /app/studies/runs

USER 10001
ENTRYPOINT ["autoresearch"]
CMD ["--help"]
