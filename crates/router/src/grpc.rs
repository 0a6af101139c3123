//! The `syft.router.v1.Router` gRPC service.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use syft_proto::router::router_server::{Router, RouterServer};
use syft_proto::router::{
    ChatRequest, ChatResponse, ChatStreamEvent, GetLimitsRequest, GetLimitsResponse,
    GetMetadataRequest, Metadata, SearchRequest, SearchResponse,
};
use tonic::{Request, Response, Status};

use crate::config::RouterConfig;
use crate::error::RouterError;
use crate::limits::RateHeaders;
use crate::service::RouterService;
use crate::validate::assign_request_id;

/// gRPC adapter over [`RouterService`].
#[derive(Clone)]
pub struct GrpcRouter {
    service: RouterService,
}

impl GrpcRouter {
    pub fn new(service: RouterService) -> Self {
        GrpcRouter { service }
    }

    /// The largest message the gRPC front takes: the longest prompt or query and 1 MiB for the
    /// rest.
    pub fn max_message_bytes(config: &RouterConfig) -> usize {
        config.largest_text_bytes().saturating_add(1024 * 1024)
    }

    /// The tonic service, with message size limits derived from the prompt limit (larger
    /// messages fail with `RESOURCE_EXHAUSTED` in the transport; smaller over-limit prompts get
    /// `INVALID_ARGUMENT` from validation).
    pub fn into_server(self) -> RouterServer<GrpcRouter> {
        let limit = Self::max_message_bytes(self.service.config());
        RouterServer::new(self)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(usize::MAX)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<ChatStreamEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Router for GrpcRouter {
    async fn chat(&self, request: Request<ChatRequest>) -> Result<Response<ChatResponse>, Status> {
        let mut req = request.into_inner();
        let id = assign_request_id(&mut req.request_id);
        let (resp, limits) = (self.service.chat_with_limits(req).await).map_err(refused(&id))?;
        let replay = resp.replay;
        Ok(answered(resp, replay, &limits))
    }

    type ChatStreamStream = EventStream;

    async fn chat_stream(
        &self,
        request: Request<ChatRequest>,
    ) -> Result<Response<Self::ChatStreamStream>, Status> {
        let mut req = request.into_inner();
        let id = assign_request_id(&mut req.request_id);
        let handle = (self.service.chat_stream(req).await).map_err(refused(&id))?;
        let events = handle.events.map(|item| item.map_err(Status::from));
        let mut resp = Response::new(Box::pin(events) as EventStream);
        if let Ok(v) = handle.request_id.parse() {
            resp.metadata_mut().insert("x-syft-request-id", v);
        }
        if let Some(Ok(v)) = handle.transfer_id.map(|t| t.parse()) {
            resp.metadata_mut().insert("x-syft-transfer-id", v);
        }
        if handle.replay {
            mark_replay(&mut resp);
        }
        limit_metadata(&mut resp, &handle.rate_limits);
        Ok(resp)
    }

    async fn search(
        &self,
        request: Request<SearchRequest>,
    ) -> Result<Response<SearchResponse>, Status> {
        let mut req = request.into_inner();
        let id = assign_request_id(&mut req.request_id);
        let (resp, limits) = (self.service.search_with_limits(req).await).map_err(refused(&id))?;
        let replay = resp.replay;
        Ok(answered(resp, replay, &limits))
    }

    async fn get_metadata(
        &self,
        _request: Request<GetMetadataRequest>,
    ) -> Result<Response<Metadata>, Status> {
        Ok(Response::new(self.service.metadata()))
    }

    async fn get_limits(
        &self,
        request: Request<GetLimitsRequest>,
    ) -> Result<Response<GetLimitsResponse>, Status> {
        let left = self.service.get_limits(request.into_inner()).await?;
        Ok(Response::new(left))
    }
}

/// `error` as the refusal of the request `request_id` names: its status carries the id its usage
/// row is under, as an answer's metadata does.
fn refused(request_id: &Option<String>) -> impl FnOnce(RouterError) -> Status + '_ {
    move |error| {
        let mut status = Status::from(error);
        if let Some(Ok(v)) = request_id.as_deref().map(str::parse) {
            status.metadata_mut().insert("x-syft-request-id", v);
        }
        status
    }
}

/// The `x-ratelimit-*` headers as initial metadata (the HTTP front sends them as headers).
fn limit_metadata<T>(resp: &mut Response<T>, limits: &RateHeaders) {
    for (name, value) in limits.pairs() {
        if let Ok(v) = value.parse() {
            resp.metadata_mut().insert(name, v);
        }
    }
}

/// A unary answer with its replay marker and its rate-limit metadata.
fn answered<T>(body: T, replay: bool, limits: &RateHeaders) -> Response<T> {
    let mut resp = Response::new(body);
    if replay {
        mark_replay(&mut resp);
    }
    limit_metadata(&mut resp, limits);
    resp
}

/// The replay marker as metadata (besides the `replay` field), like the HTTP front's header.
fn mark_replay<T>(resp: &mut Response<T>) {
    resp.metadata_mut().insert(
        "x-syft-replay",
        tonic::metadata::MetadataValue::from_static("true"),
    );
}
