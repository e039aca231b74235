"""The wire: codecs, gRPC peer server/client, gradient accumulator and the Collectives seam."""
