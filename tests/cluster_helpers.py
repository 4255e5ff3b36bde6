"""A real NATS cluster on loopback for replication and fault tests: the nodes `llmos up --cluster`
starts (llmos.cluster), three `nats-server` processes joined by routes, JetStream on each with its
own store. Nodes can be killed (SIGKILL, a crash) and started again on the same ports and store.
"""

from llmos.cluster import ClusterNode, NatsCluster, nats_cluster

__all__ = ["ClusterNode", "NatsCluster", "nats_cluster"]
