//! The embedded broker and the client, end to end over loopback on ephemeral ports.
//!
//! Every wait is on an event with a timeout; nothing sleeps to synchronise. rumqttd cannot be
//! stopped, so each test starts its own broker and leaves it running until the test process
//! exits.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use tinyfleet_broker::{
    AckOutcome, BrokerConfig, BrokerError, ClientConfig, ClientEvent, ConnectAuth, Connection,
    EmbeddedBroker, PUBLISH_HEADER_ALLOWANCE, TlsConfig, connect, shared,
};
use tokio::sync::mpsc;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);

/// Username -> password.
struct TableAuth(HashMap<String, String>);

impl ConnectAuth for TableAuth {
    fn authenticate(&self, _client_id: &str, username: &str, password: &str) -> bool {
        self.0.get(username).is_some_and(|p| p == password)
    }
}

fn auth() -> Arc<dyn ConnectAuth> {
    let mut table = HashMap::new();
    table.insert("ingest".to_owned(), "ingest-pw".to_owned());
    table.insert("dev1".to_owned(), "dev1-pw".to_owned());
    Arc::new(TableAuth(table))
}

fn small_config() -> BrokerConfig {
    BrokerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        max_payload: 1024,
        max_connections: 64,
        segment_bytes: 64 * 1024,
        segment_count: 4,
        ..BrokerConfig::default()
    }
}

fn start() -> EmbeddedBroker {
    start_with(&small_config())
}

fn start_with(config: &BrokerConfig) -> EmbeddedBroker {
    let broker = EmbeddedBroker::start(config, auth()).unwrap();
    assert_ne!(broker.local_addr().port(), 0);
    broker
}

fn client_config(broker: &EmbeddedBroker, client_id: &str, user: &str, pw: &str) -> ClientConfig {
    ClientConfig {
        url_host: broker.local_addr().ip().to_string(),
        port: broker.local_addr().port(),
        client_id: client_id.to_owned(),
        username: Some(user.to_owned()),
        password: Some(pw.to_owned()),
        keep_alive_s: 5,
        max_packet: 64 * 1024,
        backoff_min_ms: 10,
        backoff_max_ms: 100,
        ..ClientConfig::default()
    }
}

/// A client whose events are forwarded to a channel by a background task.
struct Driven {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<ClientEvent>,
    task: tokio::task::JoinHandle<Connection>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

fn drive(config: &ClientConfig) -> Driven {
    let (client, connection) = connect(config);
    drive_connection(client, connection)
}

fn drive_connection(client: AsyncClient, mut connection: Connection) -> Driven {
    let (tx, events) = mpsc::unbounded_channel();
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stop_rx => return connection,
                event = connection.next() => {
                    if tx.send(event).is_err() {
                        return connection;
                    }
                }
            }
        }
    });
    Driven {
        client,
        events,
        task,
        stop: Some(stop_tx),
    }
}

impl Driven {
    /// Waits for the first event `pick` accepts, skipping the others.
    async fn wait_for<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&ClientEvent) -> Option<T>,
    ) -> T {
        let result = timeout(WAIT, async {
            while let Some(event) = self.events.recv().await {
                if let Some(found) = pick(&event) {
                    return Some(found);
                }
            }
            None
        })
        .await;
        match result {
            Ok(Some(found)) => found,
            Ok(None) => panic!("event stream ended while waiting for {what}"),
            Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
        }
    }

    async fn connected(&mut self) -> bool {
        self.wait_for("CONNACK", |e| match e {
            ClientEvent::Connected { session_present } => Some(*session_present),
            _ => None,
        })
        .await
    }

    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        self.wait_for("SUBACK", |e| match e {
            ClientEvent::Other(Event::Incoming(Packet::SubAck(_))) => Some(()),
            _ => None,
        })
        .await;
    }

    async fn message(&mut self) -> rumqttc::Publish {
        self.wait_for("a message", |e| match e {
            ClientEvent::Message(p) => Some(p.clone()),
            _ => None,
        })
        .await
    }

    async fn publish_acked(&mut self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
        self.wait_for("PUBACK", |e| match e {
            ClientEvent::Other(Event::Incoming(Packet::PubAck(_))) => Some(()),
            _ => None,
        })
        .await;
    }

    /// Stops driving the connection and drops it: the socket closes without DISCONNECT.
    async fn crash(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        drop(self.task.await.unwrap());
    }

    /// Sends DISCONNECT, waits until it is on the wire, and stops driving the connection.
    async fn disconnect(mut self) {
        self.client.disconnect().await.unwrap();
        self.wait_for("outgoing DISCONNECT", |e| match e {
            ClientEvent::Other(Event::Outgoing(Outgoing::Disconnect)) => Some(()),
            _ => None,
        })
        .await;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        drop(self.task.await.unwrap());
    }
}

#[tokio::test]
async fn authenticated_client_round_trips_a_qos1_message() {
    let broker = start();
    let mut sub = drive(&client_config(&broker, "ingest-a", "ingest", "ingest-pw"));
    assert!(!sub.connected().await);
    sub.subscribe("tf/v1/+/sum").await;

    let mut device = drive(&client_config(&broker, "dev1", "dev1", "dev1-pw"));
    device.connected().await;
    device
        .publish_acked("tf/v1/dev1/sum", b"summary-1".to_vec())
        .await;

    let message = sub.message().await;
    assert_eq!(message.topic, "tf/v1/dev1/sum");
    assert_eq!(&message.payload[..], b"summary-1");
    assert_eq!(message.qos, QoS::AtLeastOnce);
}

/// rumqttd refuses a bad login by closing the connection without a CONNACK: rumqttc reports
/// `MqttState(ConnectionAborted)`, never `ConnectionRefused(BadUserNamePassword)`.
#[tokio::test]
async fn wrong_password_and_unknown_user_are_refused() {
    let broker = start();
    for (user, pw) in [("dev1", "wrong"), ("nobody", "dev1-pw"), ("dev1", "")] {
        let config = client_config(&broker, "intruder", user, pw);
        let (_client, mut connection) = connect(&config);
        // The wrapper keeps retrying and never reports a connection.
        let outcome = timeout(Duration::from_millis(300), connection.next()).await;
        assert!(
            !matches!(outcome, Ok(ClientEvent::Connected { .. })),
            "{user} got in"
        );
        assert!(connection.consecutive_failures() >= 1, "{user}");

        // The raw event loop shows what the refusal looks like on the wire.
        let mut options =
            rumqttc::MqttOptions::new("intruder", config.url_host.clone(), config.port);
        options.set_credentials(user, pw);
        let (_client, mut eventloop) = AsyncClient::new(options, 10);
        let error = timeout(WAIT, eventloop.poll())
            .await
            .expect("the refusal must be prompt")
            .expect_err("a bad login must not get a CONNACK");
        assert!(
            matches!(
                error,
                rumqttc::ConnectionError::MqttState(rumqttc::StateError::ConnectionAborted)
            ),
            "{user}: expected the connection to be closed, got {error:?}"
        );
    }

    // No credentials at all: refused before ConnectAuth is asked.
    let options = rumqttc::MqttOptions::new(
        "anonymous",
        broker.local_addr().ip().to_string(),
        broker.local_addr().port(),
    );
    let (_client, mut eventloop) = AsyncClient::new(options, 10);
    let error = timeout(WAIT, eventloop.poll()).await.unwrap().unwrap_err();
    assert!(
        matches!(
            error,
            rumqttc::ConnectionError::MqttState(rumqttc::StateError::ConnectionAborted)
        ),
        "{error:?}"
    );

    // The broker still serves good clients.
    let mut good = drive(&client_config(&broker, "dev1", "dev1", "dev1-pw"));
    good.connected().await;
}

/// A publish over the limit is dropped and its sender disconnected; the broker and the other
/// clients carry on, and the sender's next valid message goes through after its reconnect.
#[tokio::test]
async fn oversized_payload_is_not_delivered_and_the_broker_survives() {
    let config = small_config();
    let broker = start_with(&config);
    let mut sub = drive(&client_config(&broker, "ingest-c", "ingest", "ingest-pw"));
    sub.connected().await;
    sub.subscribe("tf/v1/+/sum").await;

    let mut device = drive(&client_config(&broker, "dev1", "dev1", "dev1-pw"));
    device.connected().await;

    // Exactly max_payload on the longest protocol topic is accepted.
    let long_topic = format!("tf/v1/{}/sum", "d".repeat(64));
    device
        .publish_acked(&long_topic, vec![b'a'; config.max_payload])
        .await;
    let first = sub.message().await;
    assert_eq!(first.payload.len(), config.max_payload);

    // Beyond max_payload + the header allowance the broker drops the connection.
    let oversized = vec![b'x'; config.max_payload + PUBLISH_HEADER_ALLOWANCE + 1];
    device
        .client
        .publish("tf/v1/dev1/sum", QoS::AtLeastOnce, false, oversized)
        .await
        .unwrap();
    // The device's connection is closed by the broker and comes back (clean session: rumqttc
    // drops the unacknowledged oversized publish instead of re-sending it).
    let session_present = device.connected().await;
    assert!(!session_present);

    device
        .publish_acked("tf/v1/dev1/sum", b"after".to_vec())
        .await;
    let next = sub.message().await;
    assert_eq!(
        &next.payload[..],
        b"after",
        "the oversized message must not be delivered"
    );
}

/// "Restarting ingest loses no acknowledged summary": a persistent session (clean_session =
/// false) keeps its QoS 1 subscription while the subscriber is away, and the broker delivers the
/// messages published meanwhile when it comes back with the same client id.
#[tokio::test]
async fn persistent_session_receives_what_was_published_while_away() {
    let broker = start();
    let ingest_config = ClientConfig {
        clean_session: false,
        ..client_config(&broker, "ingest-persistent", "ingest", "ingest-pw")
    };
    let mut ingest = drive(&ingest_config);
    assert!(!ingest.connected().await, "a new session has no state");
    ingest.subscribe("tf/v1/+/sum").await;
    ingest.disconnect().await;

    let mut device = drive(&client_config(&broker, "dev1", "dev1", "dev1-pw"));
    device.connected().await;
    for i in 0..5u8 {
        device.publish_acked("tf/v1/dev1/sum", vec![i]).await;
    }

    let mut ingest = drive(&ingest_config);
    let session_present = ingest.connected().await;
    assert!(session_present, "rumqttd resumes the persistent session");
    // Do not subscribe again: the session kept the subscription. A marker published after the
    // reconnect arrives after everything queued before it.
    device
        .publish_acked("tf/v1/dev1/sum", b"marker".to_vec())
        .await;
    let mut received = Vec::new();
    loop {
        let message = ingest.message().await;
        if &message.payload[..] == b"marker" {
            break;
        }
        received.push(message.payload[0]);
    }
    assert_eq!(received, vec![0, 1, 2, 3, 4]);
}

/// A subscriber that crashes (no DISCONNECT) after receiving messages it has not acknowledged
/// (manual acks) gets them again when its persistent session resumes: an ingest replica only
/// acknowledges a summary once it is stored, so a crash in between loses nothing.
#[tokio::test]
async fn unacknowledged_messages_are_redelivered_after_a_crash() {
    let broker = start();
    let ingest_config = ClientConfig {
        clean_session: false,
        manual_acks: true,
        ..client_config(&broker, "ingest-crash", "ingest", "ingest-pw")
    };
    let mut ingest = drive(&ingest_config);
    ingest.connected().await;
    ingest.subscribe("tf/v1/+/sum").await;

    let mut device = drive(&client_config(&broker, "dev1", "dev1", "dev1-pw"));
    device.connected().await;
    for i in 0..5u8 {
        device.publish_acked("tf/v1/dev1/sum", vec![i]).await;
    }
    // Receive all five, acknowledge only the first two.
    for i in 0..5u8 {
        let message = ingest.message().await;
        assert_eq!(message.payload[0], i);
        if i < 2 {
            ingest.client.ack(&message).await.unwrap();
        }
    }
    // The PUBACKs for 0 and 1 are on the wire once the event loop reports them outgoing.
    let mut acked = 0;
    while acked < 2 {
        ingest
            .wait_for("outgoing PUBACK", |e| match e {
                ClientEvent::Other(Event::Outgoing(Outgoing::PubAck(_))) => Some(()),
                _ => None,
            })
            .await;
        acked += 1;
    }
    // Crash: stop polling and drop the socket without DISCONNECT.
    ingest.crash().await;

    let mut ingest = drive(&ingest_config);
    assert!(ingest.connected().await, "the session survives the crash");
    device
        .publish_acked("tf/v1/dev1/sum", b"marker".to_vec())
        .await;
    let mut redelivered = Vec::new();
    loop {
        let message = ingest.message().await;
        if &message.payload[..] == b"marker" {
            break;
        }
        redelivered.push(message.payload[0]);
        ingest.client.ack(&message).await.unwrap();
    }
    assert_eq!(redelivered, vec![2, 3, 4]);
}

/// rumqttd 0.20 does not accept PUBACKs out of order: acknowledging the second message before
/// the first disconnects the subscriber, and the broker counts the *first* message as
/// acknowledged: after the session resumes only the second comes again, the first is lost. A
/// manual-ack consumer must acknowledge strictly in the order it received, per connection.
#[tokio::test]
async fn out_of_order_ack_disconnects_the_subscriber_and_loses_the_head() {
    let broker = start();
    let ingest_config = ClientConfig {
        clean_session: false,
        manual_acks: true,
        ..client_config(&broker, "ingest-ooo", "ingest", "ingest-pw")
    };
    let mut ingest = drive(&ingest_config);
    ingest.connected().await;
    ingest.subscribe("tf/v1/+/sum").await;

    let mut device = drive(&client_config(&broker, "dev1", "dev1", "dev1-pw"));
    device.connected().await;
    device.publish_acked("tf/v1/dev1/sum", vec![0]).await;
    device.publish_acked("tf/v1/dev1/sum", vec![1]).await;
    let first = ingest.message().await;
    let second = ingest.message().await;
    assert_eq!((first.payload[0], second.payload[0]), (0, 1));

    ingest.client.ack(&second).await.unwrap();
    assert!(
        ingest.connected().await,
        "the broker dropped the connection; the session resumes"
    );
    device.publish_acked("tf/v1/dev1/sum", vec![9]).await;
    let mut redelivered = Vec::new();
    loop {
        let message = ingest.message().await;
        ingest.client.ack(&message).await.unwrap();
        if message.payload[0] == 9 {
            break;
        }
        redelivered.push(message.payload[0]);
    }
    assert_eq!(
        redelivered,
        vec![1],
        "message 0 was never acknowledged, yet is gone"
    );
}

/// `Acker` turns acknowledgements finished in any order into PUBACKs in receive order: no
/// disconnect, and after a crash nothing acknowledged comes back and nothing is lost.
#[tokio::test]
async fn acker_sends_acks_in_receive_order() {
    let broker = start();
    let ingest_config = ClientConfig {
        clean_session: false,
        manual_acks: true,
        ..client_config(&broker, "ingest-acker", "ingest", "ingest-pw")
    };
    let (client, connection) = connect(&ingest_config);
    let acker = connection.acker(&client);
    let mut ingest = drive_connection(client, connection);
    ingest.connected().await;
    ingest.subscribe("tf/v1/+/sum").await;

    let mut device = drive(&client_config(&broker, "dev1", "dev1", "dev1-pw"));
    device.connected().await;
    for i in 0..4u8 {
        device.publish_acked("tf/v1/dev1/sum", vec![i]).await;
    }
    let mut tokens = Vec::new();
    for i in 0..4u8 {
        let message = ingest.message().await;
        assert_eq!(message.payload[0], i);
        tokens.push(Some(acker.token(&message)));
    }
    let mut take = |i: usize| tokens[i].take().unwrap();
    assert_eq!(acker.ack(take(2)), AckOutcome::Deferred);
    assert_eq!(acker.ack(take(0)), AckOutcome::Sent);
    assert_eq!(acker.ack(take(1)), AckOutcome::Sent);
    // 0, 1 and 2 are acknowledged; 3 is not.
    for _ in 0..3 {
        ingest
            .wait_for("outgoing PUBACK", |e| match e {
                ClientEvent::Connected { .. } => panic!("the broker dropped the connection"),
                ClientEvent::Other(Event::Outgoing(Outgoing::PubAck(_))) => Some(()),
                _ => None,
            })
            .await;
    }
    ingest.crash().await;

    let mut ingest = drive(&ingest_config);
    assert!(ingest.connected().await);
    device.publish_acked("tf/v1/dev1/sum", vec![9]).await;
    let mut redelivered = Vec::new();
    loop {
        let message = ingest.message().await;
        ingest.client.ack(&message).await.unwrap();
        if message.payload[0] == 9 {
            break;
        }
        redelivered.push(message.payload[0]);
    }
    assert_eq!(redelivered, vec![3]);
}

/// More acknowledgements than rumqttc's request channel holds, all released while nothing
/// polls the event loop (in ingest: its task waits for room in the pipeline's channel): `ack`
/// returns at once, the PUBACKs beyond the channel wait in the `Acker`'s outbox, and
/// `flush` after each event hands them over in receive order (rumqttd disconnects a client
/// whose PUBACKs come out of order).
#[tokio::test]
async fn acks_beyond_the_request_channel_wait_and_go_out_in_order() {
    let broker = start();
    let ingest_config = ClientConfig {
        clean_session: false,
        manual_acks: true,
        // A request channel of 10 (rumqttc's least).
        inflight: 1,
        ..client_config(&broker, "ingest-outbox", "ingest", "ingest-pw")
    };
    let (client, mut connection) = connect(&ingest_config);
    let acker = connection.acker(&client);
    let next = async |connection: &mut Connection| {
        timeout(WAIT, connection.next()).await.expect("an event")
    };
    loop {
        if let ClientEvent::Connected { .. } = next(&mut connection).await {
            break;
        }
    }
    client
        .subscribe("tf/v1/+/sum", QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let ClientEvent::Other(Event::Incoming(Packet::SubAck(_))) = next(&mut connection).await
        {
            break;
        }
    }
    let mut device = drive(&client_config(&broker, "dev1", "dev1", "dev1-pw"));
    device.connected().await;
    let n = 40u8;
    for i in 0..n {
        device.publish_acked("tf/v1/dev1/sum", vec![i]).await;
    }
    let mut received = Vec::new();
    let mut tokens = Vec::new();
    while received.len() < usize::from(n) {
        if let ClientEvent::Message(p) = next(&mut connection).await {
            tokens.push(acker.token(&p));
            received.push(p.pkid);
        }
    }
    // Nothing polls now; every acknowledgement is released at once, none waits.
    for token in tokens {
        assert_eq!(acker.ack(token), AckOutcome::Sent);
    }
    assert!(
        acker.outstanding() >= usize::from(n) - 10,
        "the outbox holds the rest"
    );
    let mut sent = Vec::new();
    while sent.len() < received.len() {
        match next(&mut connection).await {
            ClientEvent::Other(Event::Outgoing(Outgoing::PubAck(pkid))) => sent.push(pkid),
            ClientEvent::Connected { .. } => panic!("the broker dropped the connection"),
            _ => {}
        }
        acker.flush();
    }
    assert_eq!(sent, received);
    assert_eq!(acker.outstanding(), 0);
    // Acknowledged for good: a new session of the same client gets nothing again.
    drop(connection);
    let mut ingest = drive(&ingest_config);
    assert!(ingest.connected().await);
    device.publish_acked("tf/v1/dev1/sum", vec![99]).await;
    let message = ingest.message().await;
    assert_eq!(message.payload[0], 99, "nothing acknowledged came back");
}

/// An acknowledgement for a message of a connection that has since ended is not sent; the
/// broker redelivers the message on the resumed session, where it is acknowledged normally.
#[tokio::test]
async fn acker_drops_acks_from_before_a_reconnect() {
    let broker = start();
    let ingest_config = ClientConfig {
        clean_session: false,
        manual_acks: true,
        ..client_config(&broker, "ingest-stale", "ingest", "ingest-pw")
    };
    let (client, connection) = connect(&ingest_config);
    let acker = connection.acker(&client);
    let mut ingest = drive_connection(client, connection);
    ingest.connected().await;
    ingest.subscribe("tf/v1/+/sum").await;

    let mut device = drive(&client_config(&broker, "dev1", "dev1", "dev1-pw"));
    device.connected().await;
    device.publish_acked("tf/v1/dev1/sum", vec![0]).await;
    let old = ingest.message().await;
    let old_token = acker.token(&old);

    // Make the broker drop the connection: a QoS 0 publish over its limit (QoS 0, so rumqttc
    // does not re-send it after the reconnect).
    ingest
        .client
        .publish("tf/v1/x/big", QoS::AtMostOnce, false, vec![0; 4096])
        .await
        .unwrap();
    assert!(ingest.connected().await, "the session resumes");
    assert_eq!(acker.ack(old_token), AckOutcome::Stale);

    let again = ingest.message().await;
    assert_eq!(again.payload[0], 0);
    assert_eq!(acker.ack(acker.token(&again)), AckOutcome::Sent);
    ingest
        .wait_for("outgoing PUBACK", |e| match e {
            ClientEvent::Connected { .. } => panic!("the broker dropped the connection"),
            ClientEvent::Other(Event::Outgoing(Outgoing::PubAck(_))) => Some(()),
            _ => None,
        })
        .await;
    ingest.crash().await;

    let mut ingest = drive(&ingest_config);
    assert!(ingest.connected().await);
    device.publish_acked("tf/v1/dev1/sum", vec![9]).await;
    let message = ingest.message().await;
    assert_eq!(
        message.payload[0], 9,
        "0 was acknowledged once, on the right connection"
    );
}

/// `$share/g/...` splits the messages between the group's members, each message to exactly one.
#[tokio::test]
async fn shared_subscription_splits_messages_without_duplicates() {
    let broker = start();
    let filter = shared(Some("g"), "tf/v1/+/sum");
    assert_eq!(filter, "$share/g/tf/v1/+/sum");
    let mut a = drive(&client_config(&broker, "ingest-1", "ingest", "ingest-pw"));
    let mut b = drive(&client_config(&broker, "ingest-2", "ingest", "ingest-pw"));
    a.connected().await;
    b.connected().await;
    a.subscribe(&filter).await;
    b.subscribe(&filter).await;

    let mut device = drive(&client_config(&broker, "dev1", "dev1", "dev1-pw"));
    device.connected().await;
    for i in 0..20u8 {
        device.publish_acked("tf/v1/dev1/sum", vec![i]).await;
    }

    // Each member receives its share, then markers until both have seen one: anything sent to
    // a member before its marker has arrived by then.
    let (tx, mut rx) = mpsc::unbounded_channel::<(char, Vec<u8>)>();
    for (name, mut member) in [('a', a), ('b', b)] {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                let message = member.message().await;
                if tx.send((name, message.payload.to_vec())).is_err() {
                    return;
                }
            }
        });
    }
    let mut got: BTreeMap<char, Vec<u8>> = BTreeMap::new();
    let mut marker_seen = BTreeMap::new();
    let mut markers = 0u8;
    while marker_seen.len() < 2 {
        if markers < 10 {
            device
                .publish_acked("tf/v1/dev1/sum", vec![200 + markers])
                .await;
            markers += 1;
        }
        let (name, payload) = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
        if payload[0] >= 200 {
            marker_seen.insert(name, ());
        } else {
            got.entry(name).or_default().push(payload[0]);
        }
        // Drain what is already there before publishing another marker.
        while let Ok((name, payload)) = rx.try_recv() {
            if payload[0] >= 200 {
                marker_seen.insert(name, ());
            } else {
                got.entry(name).or_default().push(payload[0]);
            }
        }
    }

    let mut all: Vec<u8> = got.values().flatten().copied().collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..20).collect::<Vec<u8>>(),
        "each message exactly once: {got:?}"
    );
    assert!(got.get(&'a').is_some_and(|v| !v.is_empty()), "{got:?}");
    assert!(got.get(&'b').is_some_and(|v| !v.is_empty()), "{got:?}");
}

/// Beyond `max_connections` a CONNECT is closed without CONNACK; the connected client is not
/// disturbed.
#[tokio::test]
async fn connections_beyond_the_limit_are_closed_without_connack() {
    let broker = start_with(&BrokerConfig {
        max_connections: 1,
        ..small_config()
    });
    let mut first = drive(&client_config(
        &broker,
        "ingest-only",
        "ingest",
        "ingest-pw",
    ));
    first.connected().await;

    let mut options = rumqttc::MqttOptions::new(
        "dev1",
        broker.local_addr().ip().to_string(),
        broker.local_addr().port(),
    );
    options.set_credentials("dev1", "dev1-pw");
    let (_client, mut eventloop) = AsyncClient::new(options, 10);
    let error = timeout(WAIT, eventloop.poll())
        .await
        .expect("the refusal must be prompt")
        .expect_err("no room for a second connection");
    assert!(
        matches!(
            error,
            rumqttc::ConnectionError::MqttState(rumqttc::StateError::ConnectionAborted)
        ),
        "{error:?}"
    );

    first.subscribe("tf/v1/+/sum").await;
}

#[test]
fn invalid_configurations_are_refused_before_anything_starts() {
    let cases = [
        (
            BrokerConfig {
                max_payload: 0,
                ..small_config()
            },
            "broker.max_payload",
        ),
        (
            BrokerConfig {
                max_payload: 300 * 1024 * 1024,
                segment_bytes: 400 * 1024 * 1024,
                ..small_config()
            },
            "broker.max_payload",
        ),
        (
            BrokerConfig {
                max_payload: 64 * 1024,
                segment_bytes: 32 * 1024,
                ..small_config()
            },
            "broker.segment_bytes",
        ),
        (
            BrokerConfig {
                max_connections: 0,
                ..small_config()
            },
            "broker.max_connections",
        ),
        (
            BrokerConfig {
                segment_count: 0,
                ..small_config()
            },
            "broker.segment_count",
        ),
    ];
    for (config, field) in cases {
        let err = EmbeddedBroker::start(&config, auth()).unwrap_err();
        assert!(
            matches!(&err, BrokerError::InvalidConfig { field: f, .. } if *f == field),
            "{field}: {err}"
        );
        assert!(err.to_string().contains(field), "{err}");
    }

    let missing = BrokerConfig {
        tls: Some(TlsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            cert_path: "/nonexistent/tinyfleet/cert.pem".into(),
            key_path: "/nonexistent/tinyfleet/key.pem".into(),
        }),
        ..small_config()
    };
    let err = EmbeddedBroker::start(&missing, auth()).unwrap_err();
    if cfg!(feature = "tls") {
        assert!(
            matches!(err, BrokerError::TlsFile { what: "cert", .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("/nonexistent/tinyfleet/cert.pem"),
            "{err}"
        );
    } else {
        assert!(matches!(err, BrokerError::TlsUnsupported), "{err}");
    }
}

#[test]
fn port_in_use_is_reported() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = BrokerConfig {
        listen: taken.local_addr().unwrap(),
        ..small_config()
    };
    let err = EmbeddedBroker::start(&config, auth()).unwrap_err();
    assert!(matches!(err, BrokerError::Bind { .. }), "{err}");
}

#[test]
fn config_deserialises_with_defaults_and_refuses_unknown_keys() {
    let config: BrokerConfig =
        serde_json::from_str(r#"{"listen": "0.0.0.0:1884", "max_payload": 4096}"#).unwrap();
    assert_eq!(config.listen, "0.0.0.0:1884".parse().unwrap());
    assert_eq!(config.max_payload, 4096);
    assert_eq!(config.segment_count, BrokerConfig::default().segment_count);
    config.validate().unwrap();

    let err = serde_json::from_str::<BrokerConfig>(r#"{"max_segment_size": 1}"#).unwrap_err();
    assert!(err.to_string().contains("max_segment_size"), "{err}");

    let tls: BrokerConfig = serde_json::from_str(
        r#"{"tls": {"listen": "127.0.0.1:8883", "cert_path": "c.pem", "key_path": "k.pem"}}"#,
    )
    .unwrap();
    assert_eq!(tls.tls.unwrap().listen.port(), 8883);
}

/// The TLS listener (crate feature `tls`): certificates made with the `openssl` CLI, and
/// `openssl s_client` as the TLS client sending a raw MQTT 3.1.1 CONNECT.
#[cfg(feature = "tls")]
mod tls {
    use super::*;
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};

    struct TlsBroker {
        broker: EmbeddedBroker,
        dir: std::path::PathBuf,
    }

    impl Drop for TlsBroker {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn tls_broker(name: &str) -> TlsBroker {
        let dir = std::env::temp_dir().join(format!("tf-broker-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let status = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec"])
            .args(["-pkeyopt", "ec_paramgen_curve:prime256v1"])
            .args(["-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null())
            .status()
            .expect("the tls feature's tests need the openssl command");
        assert!(status.success());
        let config = BrokerConfig {
            tls: Some(TlsConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                cert_path: cert,
                key_path: key,
            }),
            ..small_config()
        };
        let broker = start_with(&config);
        let tls_addr = broker.tls_addr().unwrap();
        assert_ne!(tls_addr.port(), 0);
        assert_ne!(tls_addr, broker.local_addr());
        TlsBroker { broker, dir }
    }

    /// Sends CONNECT over TLS and returns the 4 bytes answered within `wait`, or `None`.
    fn tls_connect(addr: std::net::SocketAddr, wait: Duration) -> Option<[u8; 4]> {
        // Protocol "MQTT" level 4, flags username+password+clean session, keep-alive 10 s.
        let field = |s: &str| {
            let mut v = u16::try_from(s.len()).unwrap().to_be_bytes().to_vec();
            v.extend_from_slice(s.as_bytes());
            v
        };
        let mut body = field("MQTT");
        body.extend_from_slice(&[4, 0b1100_0010, 0, 10]);
        for s in ["dev-tls", "dev1", "dev1-pw"] {
            body.extend(field(s));
        }
        let mut connect = vec![0x10, u8::try_from(body.len()).unwrap()];
        connect.extend(body);

        let mut child = Command::new("openssl")
            .args(["s_client", "-quiet", "-connect", &addr.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&connect).unwrap();
        stdin.flush().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut connack = [0u8; 4];
            if stdout.read_exact(&mut connack).is_ok() {
                let _ = tx.send(connack);
            }
        });
        let connack = rx.recv_timeout(wait).ok();
        child.kill().unwrap();
        child.wait().unwrap();
        connack
    }

    #[test]
    fn tls_listener_accepts_an_authenticated_connect() {
        let tls = tls_broker("tls-ok");
        let connack = tls_connect(tls.broker.tls_addr().unwrap(), WAIT);
        assert_eq!(connack, Some([0x20, 2, 0, 0]), "CONNACK, accepted");
    }

    /// rumqttd 0.20 runs the TLS handshake inside its accept loop, without a timeout: one
    /// client that opens a TCP connection and never starts the handshake stops the TLS listener
    /// from serving anyone else (the plain listener is not affected). This is why the TLS
    /// listener must not face untrusted networks. If this test fails, rumqttd fixed it: update
    /// the docs of `TlsConfig` and `embedded`.
    #[test]
    fn one_idle_tcp_connection_stalls_the_tls_listener() {
        let tls = tls_broker("tls-stall");
        let addr = tls.broker.tls_addr().unwrap();
        let idle = std::net::TcpStream::connect(addr).unwrap();
        assert_eq!(tls_connect(addr, Duration::from_millis(1500)), None);
        drop(idle);
        assert_eq!(tls_connect(addr, WAIT), Some([0x20, 2, 0, 0]));
    }
}

/// `EmbeddedBroker::start_with_links` (the embedded-broker benchmark's in-process subscriber): a
/// link opened before the listeners start receives what a device publishes over TCP.
#[tokio::test]
async fn an_in_process_link_receives_what_a_device_publishes() {
    use rumqttd::Notification;
    use tinyfleet_broker::embedded::LocalLink;

    let (broker, mut links) =
        EmbeddedBroker::start_with_links(&small_config(), auth(), &["tinyfleet-test-link"])
            .unwrap();
    let LocalLink { mut tx, mut rx } = links.pop().unwrap();
    assert!(links.is_empty());
    // The link's calls block: run them off the test's runtime.
    let (tx_back, rx) = tokio::task::spawn_blocking(move || {
        tx.subscribe("tf/v1/+/sum").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match rx.recv_deadline(deadline) {
                Ok(Some(Notification::DeviceAck(_))) => return (tx, rx),
                Ok(_) => {}
                Err(e) => panic!("no SUBACK on the link: {e}"),
            }
        }
    })
    .await
    .unwrap();

    let mut device = drive(&client_config(&broker, "dev1", "dev1", "dev1-pw"));
    device.connected().await;
    device
        .publish_acked("tf/v1/dev1/sum", b"summary-1".to_vec())
        .await;

    let (topic, payload) = tokio::task::spawn_blocking(move || {
        let (_tx, mut rx) = (tx_back, rx);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match rx.recv_deadline(deadline) {
                Ok(Some(Notification::Forward(f))) => {
                    return (f.publish.topic.to_vec(), f.publish.payload.to_vec());
                }
                Ok(_) => {}
                Err(e) => panic!("nothing forwarded to the link: {e}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(topic, b"tf/v1/dev1/sum");
    assert_eq!(payload, b"summary-1");
}
