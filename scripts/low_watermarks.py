#!/usr/bin/python3
"""Fails when the broker no longer holds every message of a topic.

tally devbroker (librdkafka's mock cluster) keeps only about 5 MiB per
partition and drops the oldest message sets beyond that; a test or
benchmark whose backlog outgrew it would otherwise blame the worker for
messages nobody could read.

usage: low_watermarks.py BROKERS TOPIC
"""
import sys

from confluent_kafka import Consumer, TopicPartition


def main():
    brokers, topic = sys.argv[1], sys.argv[2]
    c = Consumer({"bootstrap.servers": brokers, "group.id": "tally-lowmarks",
                  "enable.auto.commit": False})
    meta = c.list_topics(topic, timeout=10)
    parts = sorted(meta.topics[topic].partitions)
    lost = []
    for p in parts:
        low, high = c.get_watermark_offsets(TopicPartition(topic, p),
                                            timeout=10)
        if low > 0:
            lost.append("partition %d lost offsets 0..%d of %d" %
                        (p, low - 1, high))
    c.close()
    if lost:
        sys.exit("the broker dropped messages of %s (retention; use more "
                 "partitions): %s" % (topic, "; ".join(lost)))


if __name__ == "__main__":
    main()
