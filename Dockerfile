# tally: build on Debian bookworm, run on a slim image with the runtime
# libraries only.
FROM debian:bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
      build-essential cmake pkg-config librdkafka-dev libjansson-dev \
      libhiredis-dev libpq-dev libmicrohttpd-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBUILD_TESTING=OFF \
    && cmake --build build -j"$(nproc)" --target tally

# curl: the compose healthcheck asks /readyz.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends \
      librdkafka1 libjansson4 libhiredis0.14 libpq5 libmicrohttpd12 \
      ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --no-create-home tally
COPY --from=build /src/build/worker/tally /usr/local/bin/tally
USER tally
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/tally"]
CMD ["worker"]
