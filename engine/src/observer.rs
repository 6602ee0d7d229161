//! The routing observer: a hook that sees every routing decision the engine makes.
//!
//! For every token and MoE layer the observer receives the token id, its position, the phase,
//! the routed expert ids (best first) with the weights the model applies, and, for the layers
//! it asks for, the hidden state entering the MoE block (the normalised state the router
//! multiplies). The trace writer and the tests are observers.

/// Prefill (the prompt, in one pass) or decode (one generated token at a time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Phase {
    Prefill = 0,
    Decode = 1,
}

/// One routing decision: one token at one MoE layer.
#[derive(Debug, Clone, Copy)]
pub struct RouteEvent<'a> {
    /// Position of the token in the sequence (prefill and decode together).
    pub position: usize,
    /// The token being processed at that position.
    pub token_id: u32,
    pub phase: Phase,
    /// Model layer index of the MoE layer.
    pub layer: usize,
    /// Routed expert ids, best first.
    pub experts: &'a [u32],
    /// Their gate weights as the model applies them.
    pub weights: &'a [f32],
    /// The router's input, when [`RoutingObserver::wants_hidden`] said yes for this layer.
    pub hidden: Option<&'a [f32]>,
}

/// Receives every routing decision. Methods are called on the forward pass's thread, in order
/// of layer and then of token.
pub trait RoutingObserver {
    /// Whether `on_route` should receive the hidden state at this (model) layer.
    fn wants_hidden(&self, _layer: usize) -> bool {
        false
    }

    /// One routing decision.
    fn on_route(&mut self, event: &RouteEvent<'_>);
}

/// The observer that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl RoutingObserver for NoObserver {
    fn on_route(&mut self, _event: &RouteEvent<'_>) {}
}

/// An observer that keeps every event in memory (tests, small tools).
#[derive(Debug, Default, Clone)]
pub struct RecordingObserver {
    /// Model layers whose hidden states to keep.
    pub hidden_layers: Vec<usize>,
    pub events: Vec<RecordedRoute>,
}

/// An owned [`RouteEvent`].
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRoute {
    pub position: usize,
    pub token_id: u32,
    pub phase: Phase,
    pub layer: usize,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
    pub hidden: Option<Vec<f32>>,
}

impl RoutingObserver for RecordingObserver {
    fn wants_hidden(&self, layer: usize) -> bool {
        self.hidden_layers.contains(&layer)
    }

    fn on_route(&mut self, e: &RouteEvent<'_>) {
        self.events.push(RecordedRoute {
            position: e.position,
            token_id: e.token_id,
            phase: e.phase,
            layer: e.layer,
            experts: e.experts.to_vec(),
            weights: e.weights.to_vec(),
            hidden: e.hidden.map(<[f32]>::to_vec),
        });
    }
}
