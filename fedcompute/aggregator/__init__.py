"""The aggregation worker: obtains the key, decrypts and checks each contribution, sums a streaming FedAvg.

It reaches the servers only over gRPC (AggregationService, KeyService): no database credential enters it.
"""
