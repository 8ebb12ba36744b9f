-- The router's own time on each request ("overhead_ms": its time less the queue's and the node's, up to its
-- settlement), as X-Llamakit-Overhead-Ms told the client; NULL on refusals and on records made before this version.
ALTER TABLE usage ADD COLUMN overhead_ms REAL;
