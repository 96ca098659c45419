/* Peer liveness through ZMTP heartbeats (heartbeat_ivl, heartbeat_timeout):
 * a process that stops answering while its connection stays open (SIGSTOP:
 * the kernel keeps the socket, no FIN is ever sent) is found dead within
 * the configured timeout, on either side:
 *
 *  - a peer whose hub froze reports BUS_EUNAVAIL from health;
 *  - a hub whose peer froze drops it (the connection closed by the
 *    heartbeat makes the peer unreachable at the next resend), so an
 *    event that was waiting for the frozen peer's ack is acked, long
 *    before peer_timeout (set to a minute here, so only the heartbeat can
 *    be what found it).
 *
 * The frozen process is zmq_kill_receiver (see there), opened as a hub or
 * as a peer by its URI. No fixed sleeps: every wait is on a condition
 * with a deadline, and the measured detection time is checked against
 * heartbeat_timeout plus a scheduling allowance. */
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "zmq_receiver_proc.h"

#define HB_IVL_MS 100
#define HB_TIMEOUT_MS 400
/* Scheduling allowance on a loaded 2-core machine or under sanitizers;
 * well below the 5 s handshake_ivl and the 60 s peer_timeout used here,
 * so a detection inside it is the heartbeat's. */
#define HB_SLACK_MS 2500

static int
unhealthy(void *arg)
{
    return bus_broker_health(arg, NULL, 0) != BUS_OK;
}

static int
healthy(void *arg)
{
    return bus_broker_health(arg, NULL, 0) == BUS_OK;
}

static void
test_a_peer_finds_its_frozen_hub_within_heartbeat_timeout(void **state)
{
    char *dir = bt_mkdtemp("bus-zmq-hb");
    char uri[512], puri[700], file[512];
    bus_broker *peer;
    uint64_t t0, ms;
    receiver hub;

    (void)state;
    assert_non_null(dir);
    snprintf(uri, sizeof(uri), "zmq+ipc://%s/hub.sock?mode=reliable", dir);
    snprintf(file, sizeof(file), "%s/handled.txt", dir);
    receiver_start(&hub, uri, file);
    snprintf(puri, sizeof(puri),
             "zmq+ipc://%s/hub.sock?mode=reliable&bind=0&heartbeat_ivl=%d"
             "&heartbeat_timeout=%d&peer_timeout=60000",
             dir, HB_IVL_MS, HB_TIMEOUT_MS);
    peer = zt_open(puri);
    assert_true(bt_wait_for(healthy, peer, ZT_WAIT_MS));

    assert_int_equal(kill(hub.pid, SIGSTOP), 0);
    t0 = bt_now_ns();
    assert_true(bt_wait_for(unhealthy, peer, HB_TIMEOUT_MS + HB_SLACK_MS));
    ms = (bt_now_ns() - t0) / 1000000u;
    print_message("frozen hub found after %llu ms (heartbeat_timeout %d)\n",
                  (unsigned long long)ms, HB_TIMEOUT_MS);
    assert_true(ms <= HB_TIMEOUT_MS + HB_SLACK_MS);

    bus_broker_close(peer);
    receiver_kill(&hub);
    bt_rmtree(dir);
    free(dir);
}

static void
test_a_hub_drops_its_frozen_peer_within_heartbeat_timeout(void **state)
{
    char *dir = bt_mkdtemp("bus-zmq-hb");
    char uri[600], puri[700], file[512];
    bus_broker *hub;
    zt_acks a = {0};
    uint64_t t0, ms;
    receiver peer;

    (void)state;
    assert_non_null(dir);
    snprintf(uri, sizeof(uri),
             "zmq+ipc://%s/hub.sock?mode=reliable&heartbeat_ivl=%d"
             "&heartbeat_timeout=%d&resend_ivl=%d&peer_timeout=60000"
             "&linger=0",
             dir, HB_IVL_MS, HB_TIMEOUT_MS, HB_IVL_MS);
    snprintf(puri, sizeof(puri), "zmq+ipc://%s/hub.sock?mode=reliable&bind=0",
             dir);
    snprintf(file, sizeof(file), "%s/handled.txt", dir);
    hub = zt_open(uri);
    receiver_start(&peer, puri, file); /* READY: its pattern is in */

    /* The peer handles and acks while it runs. */
    assert_int_equal(
        bus_broker_publish(hub, "hb.x", zt_event(1), 0, zt_ack_fn, &a), BUS_OK);
    assert_true(zt_wait(&a.ok, 1, ZT_WAIT_MS));

    /* Frozen: the event waits for its ack until the heartbeat closes the
     * connection and the hub drops the peer. */
    assert_int_equal(kill(peer.pid, SIGSTOP), 0);
    t0 = bt_now_ns();
    assert_int_equal(
        bus_broker_publish(hub, "hb.x", zt_event(2), 0, zt_ack_fn, &a), BUS_OK);
    assert_true(zt_wait(&a.ok, 2, HB_TIMEOUT_MS + HB_IVL_MS + HB_SLACK_MS));
    ms = (bt_now_ns() - t0) / 1000000u;
    print_message("frozen peer dropped after %llu ms (heartbeat_timeout %d, "
                  "resend_ivl %d)\n",
                  (unsigned long long)ms, HB_TIMEOUT_MS, HB_IVL_MS);
    assert_true(ms <= HB_TIMEOUT_MS + HB_IVL_MS + HB_SLACK_MS);
    assert_int_equal(atomic_load(&a.failed), 0);

    bus_broker_close(hub);
    receiver_kill(&peer);
    bt_rmtree(dir);
    free(dir);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(
            test_a_peer_finds_its_frozen_hub_within_heartbeat_timeout),
        cmocka_unit_test(
            test_a_hub_drops_its_frozen_peer_within_heartbeat_timeout),
    };

    signal(SIGPIPE, SIG_IGN);
    return cmocka_run_group_tests_name("zmq heartbeat", tests, NULL, NULL);
}
