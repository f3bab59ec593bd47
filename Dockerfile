# syntax=docker/dockerfile:1
# Stratos: one static binary on a distroless, non-root base.
#
#   docker build -t stratos:dev .
#
# The binary sits at /stratos: the image pre-pull pods run it as `stratos install-noop` /
# `noop`, so the images they pull need no shell.

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
RUN rustup target add x86_64-unknown-linux-musl
WORKDIR /src
# Dependencies first, so source edits reuse the cached dependency layer.
COPY Cargo.toml Cargo.lock build.rs ./
COPY testkit/Cargo.toml testkit/Cargo.toml
RUN mkdir -p src testkit/src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs testkit/src/lib.rs \
 && cargo build --release --locked --target x86_64-unknown-linux-musl --bin stratos \
 && rm -rf src testkit/src
COPY src src
COPY crds crds
COPY testkit/src testkit/src
ARG STRATOS_GIT_REVISION=unknown
ENV STRATOS_GIT_REVISION=${STRATOS_GIT_REVISION}
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --target x86_64-unknown-linux-musl --bin stratos \
 && cp target/x86_64-unknown-linux-musl/release/stratos /stratos \
 && /stratos version

# Static binary, no shell, no package manager; runs as the distroless nonroot user.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /stratos /stratos
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["/stratos"]
CMD ["run"]
