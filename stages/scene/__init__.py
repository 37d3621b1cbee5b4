"""Scene passes: a scene's frame sequence assembled from its clips, segments of long scenes, and
how segment results are joined (docs/STAGES.md, "Scene passes")."""
