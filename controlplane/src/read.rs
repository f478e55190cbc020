//! The one read interface of the query API: every route reads counters through
//! [`CounterRead`], which the embedded store ([`EmbeddedRead`]) and Redis ([`RedisRead`])
//! both implement, so an advertiser and an admin read the same backend for the same
//! route and see the same numbers.
//!
//! Campaign ownership (which advertiser a campaign's events named) lives in the embedded
//! store, which every applied delta reaches whichever backend answers counter reads;
//! with Redis it is also shared by every box (`redis_store::owners`, first report wins),
//! and [`RedisRead`] answers ownership from that shared copy first, so every box's query
//! API decides alike. The per-dimension breakdown comes from the embedded store (Redis
//! keeps no index of a campaign's dimension values): a box breaks down what it applied.
//! Series and top-N come from Redis.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use clickgate_core::agg::{Counters, Dim};
use clickgate_core::window::Window;

use crate::redis_store::RedisQuery;
use crate::store::{BucketOut, Store, TopAd};

/// What a read returns: boxed so the trait can be used as `dyn CounterRead`.
pub type ReadFuture<'a, T> = Pin<Box<dyn Future<Output = anyhow::Result<T>> + Send + 'a>>;

/// Reads the query API needs, whatever holds the counters.
pub trait CounterRead: Send + Sync {
    /// A campaign's buckets of `window` with start in `[from_ms, to_ms)`, ascending,
    /// empty ones omitted.
    fn series(
        &self,
        campaign_id: u64,
        window: Window,
        dim: Dim,
        from_ms: u64,
        to_ms: u64,
    ) -> ReadFuture<'_, Vec<BucketOut>>;

    /// The `n` ads with most billable clicks in the bucket starting at `start`, among
    /// `advertiser`'s campaigns when given (its own top `n`, not the global top filtered);
    /// ties: lower campaign id, then lower ad id.
    fn top(
        &self,
        window: Window,
        start: u64,
        n: usize,
        advertiser: Option<u64>,
    ) -> ReadFuture<'_, Vec<TopAd>>;

    /// A campaign's counters summed over `[from_ms, to_ms)` per value of one dimension
    /// kind, most billable clicks first.
    fn breakdown(
        &self,
        campaign_id: u64,
        window: Window,
        kind: u8,
        from_ms: u64,
        to_ms: u64,
    ) -> ReadFuture<'_, Vec<(Dim, Counters)>>;

    /// The advertiser that owns a campaign (`None`: nothing about it is retained).
    fn owner(&self, campaign_id: u64) -> Option<u64>;

    /// `(campaign_id, advertiser_id)` ascending, only `advertiser`'s when given.
    fn campaigns(&self, advertiser: Option<u64>) -> Vec<(u64, u64)>;
}

fn ready<'a, T: Send + 'a>(v: T) -> ReadFuture<'a, T> {
    Box::pin(std::future::ready(Ok(v)))
}

/// Reads from the embedded store.
#[derive(Clone)]
pub struct EmbeddedRead {
    store: Arc<RwLock<Store>>,
}

impl EmbeddedRead {
    pub fn new(store: Arc<RwLock<Store>>) -> EmbeddedRead {
        EmbeddedRead { store }
    }

    fn store(&self) -> std::sync::RwLockReadGuard<'_, Store> {
        self.store.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl CounterRead for EmbeddedRead {
    fn series(
        &self,
        campaign_id: u64,
        window: Window,
        dim: Dim,
        from_ms: u64,
        to_ms: u64,
    ) -> ReadFuture<'_, Vec<BucketOut>> {
        ready(
            self.store()
                .series(campaign_id, window, dim, from_ms, to_ms),
        )
    }

    fn top(
        &self,
        window: Window,
        start: u64,
        n: usize,
        advertiser: Option<u64>,
    ) -> ReadFuture<'_, Vec<TopAd>> {
        let store = self.store();
        let ads = match advertiser {
            None => store.top_ads(window, start, n),
            Some(a) => store.top_ads_where(window, start, n, |c| store.owner(c) == Some(a)),
        };
        ready(ads)
    }

    fn breakdown(
        &self,
        campaign_id: u64,
        window: Window,
        kind: u8,
        from_ms: u64,
        to_ms: u64,
    ) -> ReadFuture<'_, Vec<(Dim, Counters)>> {
        ready(
            self.store()
                .breakdown(campaign_id, window, kind, from_ms, to_ms),
        )
    }

    fn owner(&self, campaign_id: u64) -> Option<u64> {
        self.store().owner(campaign_id)
    }

    fn campaigns(&self, advertiser: Option<u64>) -> Vec<(u64, u64)> {
        self.store().campaigns(advertiser)
    }
}

/// Reads counters from Redis; ownership and breakdowns from the embedded store (see the
/// module doc).
pub struct RedisRead {
    redis: Arc<crate::redis_store::RedisSide>,
    embedded: EmbeddedRead,
}

impl RedisRead {
    pub fn new(redis: Arc<crate::redis_store::RedisSide>, store: Arc<RwLock<Store>>) -> RedisRead {
        RedisRead {
            redis,
            embedded: EmbeddedRead::new(store),
        }
    }

    fn query(&self) -> &RedisQuery {
        &self.redis.query
    }
}

impl CounterRead for RedisRead {
    fn series(
        &self,
        campaign_id: u64,
        window: Window,
        dim: Dim,
        from_ms: u64,
        to_ms: u64,
    ) -> ReadFuture<'_, Vec<BucketOut>> {
        Box::pin(
            self.query()
                .series(campaign_id, window, dim, from_ms, to_ms),
        )
    }

    fn top(
        &self,
        window: Window,
        start: u64,
        n: usize,
        advertiser: Option<u64>,
    ) -> ReadFuture<'_, Vec<TopAd>> {
        match advertiser {
            None => Box::pin(self.query().top(window, start, n)),
            Some(a) => {
                let own: Vec<u64> = self
                    .campaigns(Some(a))
                    .into_iter()
                    .map(|(c, _)| c)
                    .collect();
                Box::pin(async move {
                    if own.is_empty() {
                        return Ok(Vec::new());
                    }
                    self.query().top_of(window, start, n, &own).await
                })
            }
        }
    }

    fn breakdown(
        &self,
        campaign_id: u64,
        window: Window,
        kind: u8,
        from_ms: u64,
        to_ms: u64,
    ) -> ReadFuture<'_, Vec<(Dim, Counters)>> {
        self.embedded
            .breakdown(campaign_id, window, kind, from_ms, to_ms)
    }

    fn owner(&self, campaign_id: u64) -> Option<u64> {
        self.redis
            .owners
            .owner(campaign_id)
            .or_else(|| self.embedded.owner(campaign_id))
    }

    fn campaigns(&self, advertiser: Option<u64>) -> Vec<(u64, u64)> {
        // The shared copy decides a campaign's owner; the store adds what it applied and
        // Redis does not show yet.
        let mut all: std::collections::BTreeMap<u64, u64> =
            self.embedded.campaigns(None).into_iter().collect();
        all.extend(self.redis.owners.campaigns(None));
        all.into_iter()
            .filter(|(_, a)| advertiser.is_none_or(|want| want == *a))
            .collect()
    }
}
