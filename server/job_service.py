"""gRPC adapter for the JobService: translates between protos and JobManager / CheckpointStore calls."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from gradhub.proto.contract.spec import JobSpec
from gradhub.proto.v1 import jobs_pb2, jobs_pb2_grpc
from gradhub.server.checkpoints import CheckpointInfo, CheckpointStore
from gradhub.server.jobs import JobManager, JobView
from gradhub.server.rpc import handler


def job_to_proto(view: JobView) -> jobs_pb2.Job:
    r = view.record
    return jobs_pb2.Job(
        id=r.id, name=r.name, mode=r.mode, state=jobs_pb2.JobState.Value(r.state), reason=r.reason,
        spec_json=r.spec_json, created_at=r.created_at, started_at=r.started_at or 0.0,
        finished_at=r.finished_at or 0.0, step=r.step, total_steps=r.total_steps, version=r.version,
        metrics=r.metrics, samples_per_second=r.samples_per_second,
        workers=[
            jobs_pb2.WorkerStatus(rank=w.rank, state=w.state, step=w.step, staleness=w.staleness,
                                  max_staleness=w.max_staleness, host=w.host, restarts=w.restarts, pid=w.pid,
                                  transport=w.transport)
            for w in view.workers
        ],
    )


def checkpoint_to_proto(info: CheckpointInfo) -> jobs_pb2.CheckpointInfo:
    return jobs_pb2.CheckpointInfo(job_id=info.job_id, step=info.step, version=info.version,
                                   size_bytes=info.size_bytes, sha256=info.sha256, created_at=info.created_at)


class JobServiceServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, manager: JobManager, checkpoints: CheckpointStore) -> None:
        self._jobs, self._ckpts = manager, checkpoints

    @handler
    def SubmitJob(self, request: jobs_pb2.SubmitJobRequest, context: grpc.ServicerContext) -> jobs_pb2.SubmitJobResponse:
        spec = JobSpec.from_json(request.spec_json)  # validated again here, whatever the client did
        view = self._jobs.submit(spec, request.working_dir_zip or None)
        return jobs_pb2.SubmitJobResponse(job=job_to_proto(view))

    @handler
    def GetJob(self, request: jobs_pb2.GetJobRequest, context: grpc.ServicerContext) -> jobs_pb2.GetJobResponse:
        return jobs_pb2.GetJobResponse(job=job_to_proto(self._jobs.get(request.job_id)))

    @handler
    def ListJobs(self, request: jobs_pb2.ListJobsRequest, context: grpc.ServicerContext) -> jobs_pb2.ListJobsResponse:
        return jobs_pb2.ListJobsResponse(jobs=[job_to_proto(v) for v in self._jobs.list()])

    @handler
    def CancelJob(self, request: jobs_pb2.CancelJobRequest, context: grpc.ServicerContext) -> jobs_pb2.CancelJobResponse:
        return jobs_pb2.CancelJobResponse(job=job_to_proto(self._jobs.cancel(request.job_id)))

    @handler
    def WatchJob(self, request: jobs_pb2.WatchJobRequest, context: grpc.ServicerContext) -> Iterator[jobs_pb2.WatchJobResponse]:
        for view in self._jobs.watch(request.job_id):
            if not context.is_active():
                return
            yield jobs_pb2.WatchJobResponse(job=job_to_proto(view))

    @handler
    def ListCheckpoints(self, request: jobs_pb2.ListCheckpointsRequest, context: grpc.ServicerContext) -> jobs_pb2.ListCheckpointsResponse:
        self._jobs.get(request.job_id)  # NOT_FOUND for an unknown job
        return jobs_pb2.ListCheckpointsResponse(
            checkpoints=[checkpoint_to_proto(i) for i in self._ckpts.list(request.job_id)])

    @handler
    def PullCheckpoint(self, request: jobs_pb2.PullCheckpointRequest, context: grpc.ServicerContext) -> Iterator[jobs_pb2.PullCheckpointResponse]:
        self._jobs.get(request.job_id)
        info = self._ckpts.get(request.job_id, request.step if request.HasField("step") else None)
        yield jobs_pb2.PullCheckpointResponse(info=checkpoint_to_proto(info))
        for data in self._ckpts.iter_bytes(info):
            yield jobs_pb2.PullCheckpointResponse(data=data)

    @handler
    def GetJobLogs(self, request: jobs_pb2.GetJobLogsRequest, context: grpc.ServicerContext) -> Iterator[jobs_pb2.GetJobLogsResponse]:
        after = 0
        while True:
            lines = self._jobs.logs(request.job_id, after=after)
            if lines:
                after = lines[-1][0]
                yield jobs_pb2.GetJobLogsResponse(lines=[text for _, text in lines])
            if not request.follow or not context.is_active():
                return
            if self._jobs.get(request.job_id).record.state.terminal:
                if not self._jobs.logs(request.job_id, after=after):
                    return
                continue
            self._jobs.wait_for_change(1.0)
